"""The sandbox the code task runs untrusted programs in.

  run.py    `Sandbox`: one confined process per program, with time, memory, process and output limits
  child.py  the launcher that runs inside the confinement (started as a script, imports nothing of opdlab)
  check.py  hostile programs and what the sandbox must do with each (`python -m opdlab.tasks.sandbox.check`)
"""
