#!/usr/bin/env bash
# Times imgfunc beside sharp (libvips), Pillow, the vips CLI and djpeg on the
# same files in the same run, and prints medians and ratios per pipeline.
#   benches/compare.sh [ITERATIONS] [FILE...]
# Default: 7 iterations over the four corpus photos. Peers are installed on
# first use by ../shared/bench/peers.sh (Debian libvips-tools and
# libjpeg-turbo-progs, Pillow, sharp).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${IMGFUNC_SHARED:-$ROOT/../shared}
ITER=${1:-7}; shift || true
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
  for f in Elephants_3840x2160.jpg Wood.jpg Storm.jpg LadyBird.jpg; do FILES+=("$SHARED/corpus/$f"); done
fi
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT

(cd "$ROOT" && cargo build --release --quiet)
BIN="$ROOT/target/release/imgfunc"

# One file at a time: ours, then the peers, then ours again, on an
# otherwise idle machine. This machine's speed drifts by up to 40 % within
# minutes, so our figure is the mean of the medians before and after the
# peers (as the load script does with bench), and the peers are run on one
# file at a time (about 25 s for the largest) to keep the two close to
# theirs.
ours() {
  "$BIN" bench --pipeline P1 --iterations "$ITER" -a 'resize:w_300|format:t_jpeg,q_85' "$@"
  "$BIN" bench --pipeline P2 --iterations "$ITER" -a 'resize:w_500,h_500,m_2|format:t_jpeg,q_85' "$@"
  "$BIN" bench --pipeline P3 --iterations "$ITER" -a 'crop:w_300|rotate:a_90|resize:h_200|format:t_png' "$@"
  "$BIN" bench --pipeline P4 --iterations "$ITER" -a 'format:t_webp,q_80' "$@"
  "$BIN" bench --pipeline P5 --iterations "$ITER" --decode-only "$@"
}
for f in "${FILES[@]}"; do
  ours "$f" >> "$OUT/ours-before.txt"
  bash "$SHARED/bench/peers.sh" "$ITER" "$f" >> "$OUT/peers.txt"
  ours "$f" >> "$OUT/ours-after.txt"
done

head -1 "$OUT/peers.txt"
echo "# imgfunc $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(rustc --version)"
python3 - "$OUT/peers.txt" "$OUT/ours-before.txt" "$OUT/ours-after.txt" <<'PY'
import statistics, sys
rows, spread = {}, []
for path in sys.argv[1:]:
    for line in open(path):
        parts = line.split()
        if len(parts) < 5 or line.startswith('#') or parts[0] == 'peer':
            continue
        peer, pipeline, name, median = parts[0], parts[1], parts[2], float(parts[3])
        row = rows.setdefault((pipeline, name), {})
        if peer == 'imgfunc' and 'imgfunc' in row:
            before = row['imgfunc']
            spread.append(abs(median - before) / min(median, before))
            median = (before + median) / 2
        row[peer] = median
order = ['P1', 'P2', 'P3', 'P4', 'P5']
print(f"{'pipeline':8} {'file':26} {'imgfunc':>8} {'sharp':>8} {'pillow':>8} {'djpeg':>8} {'ours/sharp':>10} {'ours/djpeg':>10}")
worst = {}
for (pipeline, name), r in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, kv[0][1])):
    if pipeline not in order:
        continue
    ours, sharp, pil = r.get('imgfunc'), r.get('sharp'), r.get('pillow')
    djpeg = r.get('djpeg-floor') if pipeline == 'P5' else None
    ratio = ours / sharp if ours and sharp else None
    dratio = ours / djpeg if ours and djpeg else None
    fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"
    fr = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10}"
    print(f"{pipeline:8} {name:26} {fmt(ours)} {fmt(sharp)} {fmt(pil)} {fmt(djpeg)} {fr(ratio)} {fr(dratio)}")
print(f"imgfunc: mean of its medians just before and after the peers on the same file (they differed by {100 * statistics.median(spread):.0f} % "
      f"in the median row, {100 * max(spread):.0f} % at most)")
PY
echo
echo "peak RSS, P1 on the largest file (KiB):"
BIG=$(ls -S "${FILES[@]}" | head -1)
ours_rss=$(/usr/bin/time -f %M "$BIN" process -a 'resize:w_300|format:t_jpeg,q_85' "$BIG" -o "$OUT/o.jpg" 2>&1 >/dev/null | tail -1)
vips_rss=$(/usr/bin/time -f %M vipsthumbnail "$BIG" --size 300x -o "$OUT/v.jpg[Q=85]" 2>&1 >/dev/null | tail -1)
echo "imgfunc process $ours_rss  vipsthumbnail $vips_rss  ratio $(python3 -c "print(round($ours_rss/$vips_rss,2))")"
