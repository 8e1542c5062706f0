# Postgres backend CPU per participant-like command transaction (BEGIN and SAVEPOINT, the dedupe
# lookup, a stock update, the dedupe and outbox insert, COMMIT) at a paced rate: one statement per
# round trip as sqlx sends them (serial), three flights with psycopg's pipeline mode (pipeline),
# or all in one flight (oneflight). docs/performance.md, 2026-12-06 (fifteenth session).
# Usage: pipe.py MODE RATE SECONDS, with psycopg 3 (pip install 'psycopg[binary]==3.2.*') and a
# database spbench on the local socket holding:
#   CREATE TABLE stock (sku text PRIMARY KEY, available bigint, reserved bigint);
#   INSERT INTO stock SELECT 'SKU-'||i, 1000000000, 0 FROM generate_series(0,39) i;
#   CREATE TABLE processed_commands (saga_id uuid, step text, kind text, outcome jsonb,
#       created_at timestamptz DEFAULT now(), PRIMARY KEY (saga_id, step, kind));
#   CREATE TABLE outbox (id bigserial PRIMARY KEY, topic text, message_key text, payload jsonb,
#       handed_off boolean DEFAULT true);
import os, sys, time, uuid, psycopg
mode, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
conn = psycopg.connect("host=/var/run/postgresql user=postgres dbname=spbench", autocommit=True, prepare_threshold=0)
pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
hz = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
LOOKUP = "SELECT saga_id, step, kind, outcome FROM processed_commands WHERE saga_id = ANY(%s)"
WRITE = "UPDATE stock SET available = available - 1, reserved = reserved + 1 WHERE sku = %s"
OUT = ("WITH d AS (INSERT INTO processed_commands (saga_id, step, kind, outcome) VALUES (%s, 'reserve_inventory', 'ACTION', '{\"status\":\"ok\"}') RETURNING 1) "
       "INSERT INTO outbox (topic, message_key, payload) VALUES ('saga-replies', 'k', '{\"saga\":\"x\"}')")
def one(i):
    saga = uuid.uuid4(); sku = f"SKU-{i % 40}"
    if mode == "serial":
        conn.execute("BEGIN; SAVEPOINT command", prepare=False)
        conn.execute(LOOKUP, ([saga],)).fetchall()
        conn.execute(WRITE, (sku,))
        conn.execute(OUT, (saga,))
        conn.execute("COMMIT")
    elif mode == "oneflight":
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            conn.execute("SAVEPOINT command")
            cur = conn.execute(LOOKUP, ([saga],))
            conn.execute(WRITE, (sku,))
            conn.execute(OUT, (saga,))
            conn.execute("COMMIT")
    else:
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            conn.execute("SAVEPOINT command")
            cur = conn.execute(LOOKUP, ([saga],))
            p.sync()
            cur.fetchall()
            conn.execute(WRITE, (sku,))
            p.sync()
            conn.execute(OUT, (saga,))
            conn.execute("COMMIT")
for i in range(50): one(i)  # warm: statements prepared
start, c0, n = time.monotonic(), cpu(), 0
while time.monotonic() - start < seconds:
    due = start + n / rate
    delay = due - time.monotonic()
    if delay > 0: time.sleep(delay)
    one(n); n += 1
elapsed, used = time.monotonic() - start, cpu() - c0
print(f"{mode:8s} {n} tx in {elapsed:.1f} s ({n/elapsed:.0f}/s): backend {1e6*used/n:.0f} us CPU per tx")
