cd /work/main
for s in 0 1 2; do
  PYTHONPATH=/work/main python experiments/protocol_3_unseen_knockouts.py --seed $s --threads 1 --set unseen_fraction=0.2 --model-dir /tmp/s34/uf/models_without/seed$s --out /tmp/s34/uf/without/seed$s > /tmp/s34/uf/without_$s.log 2>&1 &
  PYTHONPATH=/work/main python experiments/protocol_3_unseen_knockouts.py --seed $s --threads 1 --set unseen_fraction=0.2,neighbour_offsets=true --model-dir /tmp/s34/uf/models_with/seed$s --out /tmp/s34/uf/with/seed$s > /tmp/s34/uf/with_$s.log 2>&1 &
  wait
done
