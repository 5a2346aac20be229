#!/usr/bin/env python3
"""Load test of `imgfunc serve`: N create_object events for real photos on the
embedded store with rule P1, measured from the outside.

    benches/load.py [--runs 5] [--events 500] [--notify] [--distinct] [--bin target/release/imgfunc] [PHOTO...]

Each run measures the single-image P1 rate with `imgfunc bench` just before
and just after the load (the throughput target is 0.9 x cores x that rate;
the mean of the two is used, since the machine's speed drifts), starts the
server on a fresh data directory, places the photos in bucket `photos`
(written straight to the store folder, so no events fire, and flushed to
disk, as objects stored through a PUT are; each key a hard link to one
copy per photo, or with --distinct a copy of its own), POSTs the events
in batches of 50 as fast as the server takes them, and waits for the
outputs: an output counts as written when it is renamed under its final name
(writes are atomic renames), which the file's ctime records. The generator
shares the server's cores, so it runs no watcher threads while the server
works; latencies come from those ctimes after the run, and the peak RSS is
the kernel's high-water mark (VmHWM).

Prints, per run: completions per second and the ratio to the target (and
the same between the 10th and 90th percentile outputs, without the start-up
and the last flush), p50/p99
latency from POST to output written, the server's CPU time and page faults
per event (by thread kind) beside bench's time per image, the disks' write
requests per event while it ran, the generator's own CPU time meanwhile (it
shares the cores), context switches per event by thread kind
(`waits`: the thread slept; `preempted`: another thread took its core), and
the server's peak RSS; then the median ratio over the runs, and the median
of the server's CPU per event over bench's time per image (its cost beside
bench's, whatever share of the cores it got). Data directories are removed
only after the last run: ext4 without a journal makes new files skip inodes
deleted in the last one to five minutes (`recently_deleted`, a scan that
took half of the server's non-image CPU in a run started two minutes after
a cleanup), so a run must not follow a cleanup closely. The time of each
cleanup is kept in the load folder's parent, and the next invocation waits
until five minutes have passed (--no-wait skips that; --keep leaves the
data directories in place, so that back-to-back invocations, as when two
builds are compared, need no wait; remove them afterwards).
With --notify the rule also has a notify_url and a local receiver checks
that every invocation reported `ok`.
"""
import argparse, json, os, resource, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument('--runs', type=int, default=5)
ap.add_argument('--events', type=int, default=500)
ap.add_argument('--notify', action='store_true')
ap.add_argument('--bin', default=os.path.join(os.path.dirname(__file__), '..', 'target', 'release', 'imgfunc'))
ap.add_argument('--workers', type=int, default=0)
ap.add_argument('--no-wait', action='store_true', help='start even if a cleanup was less than five minutes ago')
ap.add_argument('--keep', action='store_true', help='leave the data directories in place (no cleanup, so the next invocation need not wait)')
ap.add_argument('--distinct', action='store_true', help='place a copy of a photo under every key, as separate uploads would, instead of hard links to one file per photo')
ap.add_argument('photos', nargs='*')
args = ap.parse_args()
corpus = os.path.join(os.environ.get('IMGFUNC_SHARED') or os.path.join(os.path.dirname(__file__), '..', '..', 'shared'), 'corpus')
photos = args.photos or [os.path.join(corpus, f) for f in ('Elephants_3840x2160.jpg', 'Wood.jpg', 'Storm.jpg', 'LadyBird.jpg')]
cores = os.cpu_count() or 1
tck = os.sysconf('SC_CLK_TCK')


def bench_ms_per_image():
    out = subprocess.run([args.bin, 'bench', '--pipeline', 'P1', '--iterations', '15', '-a', 'resize:w_300|format:t_jpeg,q_85', *photos],
                         capture_output=True, text=True, check=True).stdout.split('\n')
    medians = [float(line.split()[3]) for line in out if line.strip()]
    return sum(medians) / len(medians)


def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p


notified = {}
lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive, as a real receiver would

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        with lock:
            notified[body['event']['key']] = body
        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()

    def log_message(self, *a): pass


rule_extra = {}
if args.notify:
    rport = free_port()
    receiver = ThreadingHTTPServer(('127.0.0.1', rport), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    rule_extra['notify_url'] = f'http://127.0.0.1:{rport}/hook'


def run_time(task):
    """CPU seconds of thread /proc/<task>, exact (the scheduler's sum, in ms);
    per-thread tick counts in /proc/<task>/stat miss threads that run in
    short bursts, as the I/O threads do (a third of their time)."""
    for line in open(f'/proc/{task}/sched'):
        if line.startswith('se.sum_exec_runtime'):
            return float(line.split(':')[1]) / 1000
    return proc_stat(task)[0]


def proc_stat(path):
    """(CPU seconds, user ticks, system ticks, minor faults) of /proc/<path>."""
    fields = open(f'/proc/{path}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tck, int(fields[11]), int(fields[12]), int(fields[7])


def machine_ticks():
    """(idle + iowait, steal, total) ticks of all CPUs since boot, from /proc/stat."""
    f = [int(x) for x in open('/proc/stat').readline().split()[1:9]]
    return f[3] + f[4], f[7], sum(f)


def disk_writes():
    """Write requests completed by the machine's disks (not partitions), from /proc/diskstats."""
    total = 0
    for line in open('/proc/diskstats'):
        f = line.split()
        if os.path.exists(f'/sys/block/{f[2]}') and not f[2].startswith(('loop', 'ram')):
            total += int(f[7])
    return total


def run_once(data):
    """One load run in `data`; prints its lines and returns (ratio, ok)."""
    notified.clear()
    before_ms = bench_ms_per_image()
    funcs = os.path.join(data, 'functions'); os.makedirs(funcs)
    store = os.path.join(data, 'store')
    os.makedirs(os.path.join(store, 'photos', 'load'))
    out_dir = os.path.join(store, 'thumbs', 'gen_load')
    keys = []
    for i in range(args.events):
        src = photos[i % len(photos)]
        key = f'load/{i:04d}-{os.path.basename(src)}'
        dst = os.path.join(store, 'photos', key)
        if i < len(photos) or args.distinct:
            shutil.copyfile(src, dst)
        else:
            os.link(os.path.join(store, 'photos', keys[i % len(photos)]), dst)
        keys.append(key)
    # Stored objects are on disk before their events fire (a PUT through the
    # store flushes them); the copies above are not yet, and the server's
    # first group flush (syncfs) would write them out while jobs wait.
    os.sync()
    rule = {"bucket": "photos", "notifications": [{"id": "p1", "event_types": ["create_object"], "object_filters": ["load/*"],
            "cloudfunc": "image", "cloudfunc_args": {"action": "resize:w_300|format:t_jpeg,q_85", "save_bucket": "thumbs"},
            **rule_extra}]}
    json.dump(rule, open(os.path.join(funcs, 'p1.json'), 'w'))
    sport = free_port()
    cmd = [args.bin, 'serve', '--listen', f'127.0.0.1:{sport}', '--data', store, '--functions', funcs, '--queue', str(args.events + 10)]
    if args.workers:
        cmd += ['--workers', str(args.workers)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, 'RUST_LOG': 'warn'})
    base = f'http://127.0.0.1:{sport}'
    for _ in range(100):
        try:
            urllib.request.urlopen(base + '/healthz', timeout=1); break
        except Exception:
            time.sleep(0.1)

    def outputs():
        try:
            return [e for e in os.scandir(out_dir) if not e.name.startswith('.')]
        except FileNotFoundError:
            return []

    posted = {}
    cpu_at_start = proc_stat(server.pid)[0]
    ticks_at_start = machine_ticks()
    writes_at_start = disk_writes()
    own_at_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.time()
    for b in range(0, len(keys), 50):
        batch = keys[b:b + 50]
        events = [{"event_type": "create_object", "bucket_name": "photos", "object_key": k} for k in batch]
        req = urllib.request.Request(base + '/v1/events', data=json.dumps(events).encode(), headers={'Content-Type': 'application/json'})
        now = time.time()
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 202, r.status
        for k in batch:
            posted[k.split('/', 1)[1]] = now
    deadline = time.monotonic() + 600
    while len(outputs()) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.1)
    if args.notify:
        while len(notified) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
    own = resource.getrusage(resource.RUSAGE_SELF)
    own_ms = 1000 * (own.ru_utime + own.ru_stime - own_at_start.ru_utime - own_at_start.ru_stime)
    ticks = [b - a for a, b in zip(ticks_at_start, machine_ticks())]
    writes = disk_writes() - writes_at_start
    written = {e.name: e.stat().st_ctime_ns / 1e9 for e in outputs()}
    elapsed = max(written.values()) - start
    server_cpu = proc_stat(server.pid)
    by_thread, switches = {}, {}
    for tid in os.listdir(f'/proc/{server.pid}/task'):
        try:
            name = open(f'/proc/{server.pid}/task/{tid}/comm').read().strip().rstrip('0123456789-')
            by_thread[name] = by_thread.get(name, 0) + run_time(f'{server.pid}/task/{tid}')
            for line in open(f'/proc/{server.pid}/task/{tid}/status'):
                field, _, value = line.partition(':')
                if field in ('voluntary_ctxt_switches', 'nonvoluntary_ctxt_switches'):
                    key = (name, 'waits' if field.startswith('voluntary') else 'preempted')
                    switches[key] = switches.get(key, 0) + int(value)
        except OSError:
            pass
    peak_kib = next(int(line.split()[1]) for line in open(f'/proc/{server.pid}/status') if line.startswith('VmHWM:'))
    server.terminate(); server.wait(timeout=60)
    after_ms = bench_ms_per_image()

    bench_ms = (before_ms + after_ms) / 2
    single_rate = 1000.0 / bench_ms
    n = len(keys)
    lat = sorted((written[k] - posted[k]) * 1000 for k in written)
    rate = len(written) / elapsed
    ratio = rate / (cores * single_rate)
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(f"single-image P1 rate from bench: {single_rate:.1f} per second ({before_ms:.1f} ms before, {after_ms:.1f} ms after; "
          f"target 0.9 x {cores} cores x {single_rate:.1f} = {0.9 * cores * single_rate:.1f})")
    print(f"events {n}, outputs written {len(written)} in {elapsed:.2f} s: {rate:.1f} per second = {ratio:.3f} x cores x single rate")
    ts = sorted(written.values())
    tenth = len(ts) // 10
    if tenth and ts[-tenth - 1] > ts[tenth]:
        steady = (len(ts) - 2 * tenth) / (ts[-tenth - 1] - ts[tenth])
        print(f"between the 10th and the 90th percentile outputs (no start-up, no last flush): {steady:.1f} per second = "
              f"{steady / (cores * single_rate):.2f} x cores x single rate; first output {1000 * (ts[0] - start):.0f} ms "
              f"after the first POST")
    print(f"latency from POST to output written: p50 {pct(0.50):.0f} ms, p99 {pct(0.99):.0f} ms")
    print(f"server CPU: {server_cpu[0]:.2f} s (user {server_cpu[1] / tck:.2f}, sys {server_cpu[2] / tck:.2f}) = {server_cpu[0] * 1000 / n:.2f} ms "
          f"and {server_cpu[3] / n:.0f} page faults per event (" + ", ".join(f"{name} {t * 1000 / n:.2f} ms" for name, t in sorted(by_thread.items())) + ")")
    busy = server_cpu[0] - cpu_at_start
    print(f"server CPU from the first POST on: {busy * 1000 / n:.2f} ms per event, "
          f"{100 * busy / (elapsed * cores):.0f} % of the cores over the run; the machine meanwhile "
          f"(to up to 0.1 s after the last output): {100 * ticks[1] / max(ticks[2], 1):.0f} % stolen by the hypervisor, "
          f"{100 * ticks[0] / max(ticks[2], 1):.0f} % idle or waiting for the disk; {writes / n:.1f} disk writes per event")
    # Bench's time per image is the floor; the target, at full use of the
    # cores, allows 1 / 0.9 of it.
    cost = busy * 1000 / n / bench_ms
    print(f"server CPU per event: {cost:.3f} x bench's time per image (at most {1 / 0.9:.3f} meets the target "
          f"with the cores fully used)")
    print(f"load generator's own CPU meanwhile: {own_ms:.0f} ms ({100 * own_ms / 1000 / (elapsed * cores):.1f} % of the cores over the run)")
    print("context switches per event: " + ", ".join(f"{name} {kind} {count / n:.1f}" for (name, kind), count in sorted(switches.items())))
    print(f"peak RSS of imgfunc serve: {peak_kib / 1024:.1f} MiB")
    ok = len(written) == n
    if args.notify:
        good = sum(1 for b in notified.values() if b['status'] == 'ok')
        print(f"notifications {len(notified)}, ok {good}")
        ok = ok and good == n
    return ratio, cost, ok


base_dir = os.environ.get('IMGFUNC_LOAD_DIR') or tempfile.gettempdir()
cleaned_at = os.path.join(base_dir, 'imgfunc-load-cleanup')
RECENT_S = 300
try:
    wait = os.stat(cleaned_at).st_mtime + RECENT_S - time.time()
except FileNotFoundError:
    wait = 0
if wait > 0 and not args.no_wait:
    print(f"waiting {wait:.0f} s: the last load run's files were deleted less than {RECENT_S} s ago, "
          "and ext4 without a journal slows file creation near recently deleted inodes", flush=True)
    time.sleep(wait)
parent = tempfile.mkdtemp(prefix='imgfunc-load-', dir=base_dir)
ratios, costs, all_ok = [], [], True
try:
    for run in range(args.runs):
        print(f"run {run + 1} of {args.runs}")
        ratio, cost, ok = run_once(os.path.join(parent, f'run{run}'))
        ratios.append(ratio)
        costs.append(cost)
        all_ok = all_ok and ok
finally:
    if args.keep:
        print(f"data directories left in {parent}")
    else:
        shutil.rmtree(parent, ignore_errors=True)
        open(cleaned_at, 'w').close()
print(f"ratio to cores x single rate over {len(ratios)} runs: median {statistics.median(ratios):.3f} "
      f"(mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}); target 0.900")
print(f"server CPU per event over bench's time per image: median {statistics.median(costs):.3f} "
      f"(min {min(costs):.3f}, max {max(costs):.3f})")
sys.exit(0 if all_ok else 1)
