#!/usr/bin/env bash
# MEND on ZsRE across 2 nodes x 8 GPUs with torchrun (run this same script on every node).
#   NODE_RANK=0 MASTER_ADDR=node0 ./examples/multinode/torchrun.sh   # on node 0
#   NODE_RANK=1 MASTER_ADDR=node0 ./examples/multinode/torchrun.sh   # on node 1
# Lightning reads torchrun's environment (TorchElasticEnvironment): no launcher flags of its own.
set -euo pipefail
NNODES=${NNODES:-2}
GPUS=${GPUS:-8}
torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" --node-rank "${NODE_RANK:?}" \
    --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}" \
    train.py fit --config configs/mend/zsre.yaml --config configs/mend/llama-2-7b.yaml \
    --config configs/trainer/ddp.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS"
