"""Stage 2, the teacher: its view of every sampled token.

  scoring.py         one teacher forward over prompt + rollout: sampled-token log-prob, top-K, entropy, max-p
  views.py           the teacher's context (the student's prompt, or an oracle trace's full / partial view)
  self_teacher.py    privileged self-teachers: a frozen or EMA copy of the student
  tree_attention.py  candidate tokens one step ahead scored on the rollout's KV cache (the lookahead objective)
  remote.py          the same scores from a teacher served over HTTP
  serve.py           `opdlab serve-teacher`: that server
"""
