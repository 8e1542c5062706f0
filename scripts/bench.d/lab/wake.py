# What waking an idle process costs on this machine: a paced ping-pong of one byte between two
# processes over pipes, each on a core of its own, so that the one woken has gone idle in between.
# Prints the round trip's p50/p99 and the CPU (user + system) both processes spent per round trip.
# docs/performance.md, 2026-12-06 (sixteenth session): compare it with the kernel's idle polling
# off and on (/sys/module/haltpoll/parameters/guest_halt_poll_ns on a KVM guest).
# Usage: wake.py RATE SECONDS  (round trips a second; one per 1/RATE s, open-loop)
import os, sys, time

rate, seconds = float(sys.argv[1]), float(sys.argv[2])
hz = os.sysconf("SC_CLK_TCK")
ping_r, ping_w = os.pipe()
pong_r, pong_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(ping_w)
    os.close(pong_r)
    os.sched_setaffinity(0, {1})
    while os.read(ping_r, 1):
        os.write(pong_w, b"x")
    os._exit(0)
os.close(ping_r)
os.close(pong_w)
os.sched_setaffinity(0, {0})


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz


rounds = int(rate * seconds)
latencies = []
before = cpu(os.getpid()) + cpu(child)
start = time.perf_counter()
for i in range(rounds):
    due = start + i / rate
    pause = due - time.perf_counter()
    if pause > 0:
        time.sleep(pause)
    t0 = time.perf_counter_ns()
    os.write(ping_w, b"x")
    os.read(pong_r, 1)
    latencies.append(time.perf_counter_ns() - t0)
spent = cpu(os.getpid()) + cpu(child) - before
os.close(ping_w)
os.waitpid(child, 0)
latencies.sort()
q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1000
print(f"{rounds} round trips at {rate:g}/s: p50 {q(0.5):.1f} us, p99 {q(0.99):.1f} us, "
      f"CPU {spent / rounds * 1e6:.1f} us a round trip (both processes)")
