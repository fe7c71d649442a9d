#!/bin/bash
# USI's ablations in miniature: Fashion-MNIST, 2-core CPU, about an hour. Results and reading: RESULTS.md.
#   bash ablations.sh [OUT]        # default OUT=out/ablations; a rerun skips the runs that finished
#   bash ablations.sh OUT summary  # only print the tables from OUT/*/log.jsonl
# Every run is plain train.py: the paper's recipe, only made small (6,000 training images at 32 px,
# global batch 128, 10 epochs = "1x"), and validated once, at the end, on the full 10,000-image test set.
cd "$(dirname "$0")"
OUT=${1:-out/ablations}
SMALL="--data fashion-mnist --img_size 32 --batch_size 128 --train_subset 6000 --epochs 10 --workers 1
       --eval_every 1000 --log_every 1000"
TEACHER="--teacher resnet18 --teacher_checkpoint $OUT/teacher_resnet18_s0/best.pt"
STUDENT="--model resnet10t"
# Two runs side by side with one thread each: on 2 cores that trains ~1.9x faster than one run on both.
export OMP_NUM_THREADS=1

run() {  # run NAME TRAIN.PY-ARGS...: OUT/NAME/ holds its log.jsonl and checkpoints, OUT/NAME.log its output
  local name=$1; shift
  grep -qs '^best val top-1' "$OUT/$name.log" && return
  mkdir -p "$OUT"
  python train.py $SMALL "$@" --out_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    && echo "$name: $(tail -1 "$OUT/$name.log")" || echo "$name: FAILED, see $OUT/$name.log"
}

if [ "$2" != summary ]; then
  # Stream 1 trains the teacher first (seed 0 teaches every student), then students that need it.
  ( run teacher_resnet18_s0 --model resnet18 --teacher none
    for s in 0; do
      run patient_4x_s$s $STUDENT $TEACHER --seed $s --epochs 40                 # Table 5: 4x epochs
      run patient_2x_s$s $STUDENT $TEACHER --seed $s --epochs 20                 #          2x epochs
      for a in 1 5 inf; do run alpha_${a}_s$s $STUDENT $TEACHER --seed $s --alpha_kd $a; done  # Table 6
      for t in 2 5; do run tau_${t}_s$s $STUDENT $TEACHER --seed $s --kd_tau $t; done          # Table 7
    done
    for s in 0 1; do run mobilenet_kd_s$s --model mobilenetv3_small_100 $TEACHER --seed $s; done  # Table 2
    run xcit_kd_s1 --model xcit_nano_12_p8_224 $TEACHER --seed 1
  ) &
  # Stream 2 starts with the runs that need no teacher, the no-KD baselines, then the second seed.
  ( for s in 0 1; do run xcit_nokd_s$s --model xcit_nano_12_p8_224 --teacher none --seed $s; done
    for s in 0 1; do run alpha_0_s$s $STUDENT --teacher none --seed $s; done   # Table 6 alpha 0 = no KD
    for s in 0 1; do run mobilenet_nokd_s$s --model mobilenetv3_small_100 --teacher none --seed $s; done
    run teacher_resnet18_s1 --model resnet18 --teacher none --seed 1           # the teacher's own spread
    for s in 1; do
      run patient_4x_s$s $STUDENT $TEACHER --seed $s --epochs 40
      run patient_2x_s$s $STUDENT $TEACHER --seed $s --epochs 20
      for a in 1 5 inf; do run alpha_${a}_s$s $STUDENT $TEACHER --seed $s --alpha_kd $a; done
      for t in 2 5; do run tau_${t}_s$s $STUDENT $TEACHER --seed $s --kd_tau $t; done
    done
    run xcit_kd_s0 --model xcit_nano_12_p8_224 $TEACHER --seed 0
  ) &
  wait
fi
