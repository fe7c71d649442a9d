#!/bin/bash
# USI's ablations in miniature: Fashion-MNIST, 2-core CPU, about 110 minutes. Results and reading: RESULTS.md.
#   bash ablations.sh [OUT]        # default OUT=out/ablations; a rerun skips the runs that finished
#   bash ablations.sh OUT summary  # only print the tables from OUT/*/log.jsonl
# Every run is plain train.py: the paper's recipe, only made small (6,000 training images at 32 px,
# global batch 128, 10 epochs = "1x"), and validated once, at the end, on the full 10,000-image test set.
cd "$(dirname "$0")"
OUT=${1:-out/ablations}
SMALL="--data fashion-mnist --img_size 32 --batch_size 128 --train_subset 6000 --epochs 10 --workers 1
       --eval_every 1000 --log_every 1000"
STUDENT="--model mobilenetv3_small_100"   # the student of Tables 5-7: a mobile network, far below the teacher
# The teacher: resnet18 trained 4x longer than the students (40 epochs), as USI's teacher is a stronger,
# longer-trained model than its students. (At 10 epochs resnet18 scores below resnet10t's no-KD baseline.)
TEACHER="--teacher resnet18 --teacher_checkpoint $OUT/teacher_resnet18_s0/best.pt"
# Two runs side by side with one thread each: on 2 cores that trains ~1.9x faster than one run on both.
export OMP_NUM_THREADS=1

run() {  # run NAME TRAIN.PY-ARGS...: OUT/NAME/ holds its log.jsonl and checkpoints, OUT/NAME.log its output
  local name=$1; shift
  grep -qs '^best val top-1' "$OUT/$name.log" && return
  mkdir -p "$OUT"
  python train.py $SMALL "$@" --out_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    && echo "$name: $(tail -1 "$OUT/$name.log")" || echo "$name: FAILED, see $OUT/$name.log"
}

kd_runs() {  # kd_runs SEED: every run that needs the 40-epoch teacher, for one seed
  local s=$1
  run patient_4x_s$s $STUDENT $TEACHER --seed $s --epochs 40                              # Table 5: 4x
  run patient_2x_s$s $STUDENT $TEACHER --seed $s --epochs 20                              #          2x
  for a in 1 5 inf; do run alpha_${a}_s$s $STUDENT $TEACHER --seed $s --alpha_kd $a; done  # Table 6
  for t in 2 5; do run tau_${t}_s$s $STUDENT $TEACHER --seed $s --kd_tau $t; done          # Table 7
  run r10t_kd_s$s --model resnet10t $TEACHER --seed $s                                    # Table 2
  run xcit_kd_s$s --model xcit_nano_12_p8_224 $TEACHER --seed $s
  run resmlp_kd_s$s --model resmlp_12_224 $TEACHER --seed $s                              # an MLP
  run vit_kd_s$s --model vit_tiny_patch16_224 --model_kwargs patch_size=8 $TEACHER --seed $s  # a plain ViT
}

if [ "$2" != summary ]; then
  python -c "import quickstart; quickstart.fashion_mnist_from_debian('data')"  # offline: Debian's copy
  # Stream 1 trains the teacher first (seed 0 teaches every student), then students that need it.
  ( run teacher_resnet18_s0 --model resnet18 --teacher none --epochs 40
    kd_runs 0
    run teacher_resnet18_s1 --model resnet18 --teacher none --epochs 40 --seed 1  # the teacher's spread
  ) &
  # Stream 2 starts with the runs that need no teacher (no-KD baselines), then the second seed's KD runs.
  ( for s in 0 1; do
      run alpha_0_s$s $STUDENT --teacher none --seed $s             # Table 6: alpha_kd 0 is no KD at all
      run r10t_nokd_s$s --model resnet10t --teacher none --seed $s  # Table 2: a small CNN ...
      run xcit_nokd_s$s --model xcit_nano_12_p8_224 --teacher none --seed $s  # ... and a vision transformer
      run resmlp_nokd_s$s --model resmlp_12_224 --teacher none --seed $s      # ... and an MLP
      run vit_nokd_s$s --model vit_tiny_patch16_224 --model_kwargs patch_size=8 --teacher none --seed $s
    done
    for s in 0 1; do for x in 2 4; do  # Table 5 without KD: does KD gain more from long training?
      run patient_nokd_${x}x_s$s $STUDENT --teacher none --seed $s --epochs $((10 * x))
    done; done
    # Table 4: two teachers of similar accuracy, each trained 10 epochs without KD: a CNN and a transformer
    run teacher10_resnet18_s0 --model resnet18 --teacher none
    for s in 0 1; do
      run teacher_cnn_s$s $STUDENT --seed $s --teacher resnet18 --teacher_checkpoint $OUT/teacher10_resnet18_s0/best.pt
      run teacher_transformer_s$s $STUDENT --seed $s --teacher xcit_nano_12_p8_224 \
        --teacher_checkpoint $OUT/xcit_nokd_s0/best.pt
    done
    # the second seed's KD runs need stream 1's teacher
    until grep -qsE '^(best val top-1|train.py: error)' "$OUT/teacher_resnet18_s0.log"; do sleep 10; done
    kd_runs 1
  ) &
  wait
  # Tables 6 and 7 differ by less than two seeds' spread: a third seed for each of their runs
  ( run alpha_0_s2 $STUDENT --teacher none --seed 2
    for a in 1 5 inf; do run alpha_${a}_s2 $STUDENT $TEACHER --seed 2 --alpha_kd $a; done ) &
  ( for t in 2 5; do run tau_${t}_s2 $STUDENT $TEACHER --seed 2 --kd_tau $t; done ) &
  wait
fi

# The tables: top-1 is the final validation's better of raw and EMA weights (what train.py keeps as best),
# as the mean over seeds with each seed's value in brackets; minutes are wall time per run.
python - "$OUT" <<'PY'
import glob, json, os, statistics, sys
runs = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*', 'log.jsonl'))):
    last = [json.loads(line) for line in open(path)][-1]
    if last['val_top1'] is None:  # still running: only the last epoch is validated
        continue
    name, seed = os.path.basename(os.path.dirname(path)).rsplit('_s', 1)
    runs.setdefault(name, {})[int(seed)] = (max(last['val_top1'], last['ema_top1']), last['elapsed_s'] / 60)

def cell(name):
    if name not in runs:
        return 'not run'
    top1 = [t for t, _ in runs[name].values()]
    return f"{statistics.mean(top1):.2f} ({' / '.join(f'{t:.2f}' for t in top1)})"

def gap(kd, nokd):  # paired by seed: same seed, same data order, with and without the teacher
    seeds = sorted(set(runs.get(kd, {})) & set(runs.get(nokd, {})))
    gaps = [runs[kd][s][0] - runs[nokd][s][0] for s in seeds]
    return f"{statistics.mean(gaps):+.2f} ({' / '.join(f'{g:+.2f}' for g in gaps)})" if gaps else 'n/a'

tables = {
    'teachers (no KD)': [('resnet18, 40 epochs: the teacher', 'teacher_resnet18'),
                         ('resnet18, 10 epochs', 'teacher10_resnet18'), ('xcit_nano_12_p8_224, 10 epochs', 'xcit_nokd')],
    'Table 6: KD weight, mobilenetv3_small_100 student': [(f'alpha_kd {a}', f'alpha_{a}') for a in ('0', '1', '5', 'inf')],
    'Table 7: temperature, alpha_kd 5': [(f'tau {t}', f'tau_{t}' if t != '1' else 'alpha_5') for t in '125'],
    'Table 4: teacher type, mobilenetv3_small_100 student': [
        ('CNN teacher: resnet18, 10 epochs', 'teacher_cnn'), ('transformer teacher: xcit_nano, 10 epochs',
        'teacher_transformer'), ('(the 40-epoch resnet18 teacher)', 'alpha_5')],
}
for title, rows in tables.items():
    print(f"\n{title}\n| run | top-1 % mean (per seed) | minutes per run |\n|---|---|---|")
    for label, name in rows:
        minutes = statistics.mean(m for _, m in runs[name].values()) if name in runs else float('nan')
        print(f"| {label} | {cell(name)} | {minutes:.1f} |")
paired = {
    'Table 2: one recipe, any backbone': [
        ('resnet10t (CNN)', 'r10t_kd', 'r10t_nokd'), ('mobilenetv3_small_100 (mobile)', 'alpha_5', 'alpha_0'),
        ('xcit_nano_12_p8_224 (transformer)', 'xcit_kd', 'xcit_nokd'),
        ('vit_tiny_patch16_224, 8 px patches (plain ViT)', 'vit_kd', 'vit_nokd'),
        ('resmlp_12_224 (MLP)', 'resmlp_kd', 'resmlp_nokd')],
    'Table 5: patient teacher, mobilenetv3_small_100': [
        ('1x (10 epochs)', 'alpha_5', 'alpha_0'), ('2x (20 epochs)', 'patient_2x', 'patient_nokd_2x'),
        ('4x (40 epochs)', 'patient_4x', 'patient_nokd_4x')]}
for title, rows in paired.items():
    print(f"\n{title}\n| run | no KD | KD (alpha_kd 5) | KD gain, paired by seed |\n|---|---|---|---|")
    for label, kd, nokd in rows:
        print(f"| {label} | {cell(nokd)} | {cell(kd)} | {gap(kd, nokd)} |")
minutes = sum(m for seeds in runs.values() for _, m in seeds.values())
print(f"\n{sum(map(len, runs.values()))} runs, {minutes:.0f} minutes of training in all (two at a time)")
PY
