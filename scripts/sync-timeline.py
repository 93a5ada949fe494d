#!/usr/bin/env python3
"""Where the two cores go during one full sync: `blockrep server` and
`blockrep agent --once` of DISK run on 127.0.0.1, and every WINDOW seconds
(default 0.05) the CPU each thread used since the last sample is read from
/proc/PID/task/*/schedstat (nanoseconds, so short windows are exact). Prints
a row per window, each thread's share of a core and both processes' sums,
then the totals; the commit's time is the agent's "epoch 1 committed" line.

Usage: scripts/sync-timeline.py BLOCKREP DISK [WINDOW]
  BLOCKREP  a blockrep binary (e.g. target/release/blockrep)
  DISK      the disk image to sync (its page cache is warmed first)
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
blockrep, disk = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
window = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
work = tempfile.mkdtemp(prefix="sync-timeline.", dir=os.environ.get("TMPDIR", "/var/tmp"))
server = agent = None
try:
    tls = os.path.join(work, "tls")
    for args in (["cert", "init", "--dir", tls], ["cert", "issue", "--dir", tls, "--source", "timeline"]):
        subprocess.run([blockrep, *args], check=True, stdout=subprocess.DEVNULL)
    server = subprocess.Popen(
        [blockrep, "server", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--retention", "off", "--data", os.path.join(work, "data"), "--tls-dir", tls],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    if not line.startswith("listening on"):
        sys.exit("the server did not start")
    address = line.split()[2]
    subprocess.run(["cat", disk], stdout=subprocess.DEVNULL, check=True)
    os.sync()

    def threads(pid):
        """(thread name, CPU ns so far) of every thread of `pid`, by tid."""
        out = {}
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                name = open(task + "/comm").read().strip()
                out[task.rsplit("/", 1)[1]] = (name, int(open(task + "/schedstat").read().split()[0]))
            except OSError:
                pass  # the thread ended between the listing and the read
        return out

    agent_out = os.path.join(work, "agent.out")
    # The server's start-up is not the sync's: counted from here.
    previous = {("server", tid): (f"server:{name}", ns) for tid, (name, ns) in threads(server.pid).items()}
    started = time.monotonic()
    agent = subprocess.Popen(
        [blockrep, "agent", "--once", "--disk", disk, "--to", address, "--source", "timeline",
         "--tls-dir", tls], stdout=open(agent_out, "w"), stderr=subprocess.DEVNULL)
    rows, committed = [], None
    while agent.poll() is None:
        now = time.monotonic() - started
        current = {}
        for who, pid in (("server", server.pid), ("agent", agent.pid)):
            for tid, (name, ns) in threads(pid).items():
                current[(who, tid)] = (f"{who}:{name}", ns)
        used = {}
        for key, (name, ns) in current.items():
            used[name] = used.get(name, 0) + ns - previous.get(key, (name, 0))[1]
        rows.append((now, used))
        previous = current
        if committed is None and "epoch 1 committed" in open(agent_out).read():
            committed = now
        time.sleep(window)
    names = sorted({name for _, used in rows for name in used})
    totals = {name: sum(used.get(name, 0) for _, used in rows) / 1e9 for name in names}
    names = [name for name in names if totals[name] > 0.005]
    print(f"commit at {committed:.3f} s, agent ended at {rows[-1][0]:.3f} s" if committed
          else "no commit seen")
    print("t (s)  " + " ".join(f"{name[:16]:>16}" for name in names) + "  server  agent")
    last = 0.0
    for now, used in rows:
        span = max(now - last, 1e-9)
        last = now
        side = lambda who: sum(v for k, v in used.items() if k.startswith(who)) / 1e9 / span
        print(f"{now:5.2f}  " + " ".join(f"{used.get(n, 0) / 1e9 / span:16.2f}" for n in names)
              + f"  {side('server'):6.2f} {side('agent'):6.2f}")
    print("CPU s  " + " ".join(f"{totals[n]:16.3f}" for n in names))
finally:
    for process in (agent, server):
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait()
    shutil.rmtree(work, ignore_errors=True)
