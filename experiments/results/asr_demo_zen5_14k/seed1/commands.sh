set -e
cd /work/main; source .venv/bin/activate
R=runs/demo14k-s1; D=data/synth-14400
zeromask-train --data $D --out $R --config scripts/asr_demo.json --time-budget 900 --threads 2 --no-final-eval --seed 1 --no-progress
zeromask-eval --checkpoint $R/last.pt --data $D/test --cache-dir $D/.features --threads 2 --json $R/eval_test.json --no-progress --samples 0
zeromask-eval --checkpoint $R/last.pt --data $D/shifted --cache-dir $D/.features --threads 2 --tempo-search 0.65,0.8,1,1.25,1.5 --beam 4 --json $R/eval_shifted_search.json --no-progress --samples 0 --by engine
