"""Fine-tune ImageNet-pretrained ResNet-18 on hotdog / not-hotdog (Dive into Deep Learning, "Fine-Tuning"),
on one CPU or GPU, several GPUs, or several nodes -- one code path, Hugging Face Accelerate underneath.

    python -m data_prep --source d2l --out shards                # or a local hotdog.zip / image folder
    python train.py --data shards --debug                        # smoke test: 1 process, < 1 minute
    python train.py --data shards                                # one process (one GPU, or the CPU)
    accelerate launch train.py --data shards                     # all GPUs of this node (see launch/)
    torchrun --nproc_per_node 8 train.py --data shards           # the same with torchrun
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 \\
        train.py --data shards                                   # 2 CPU processes (gloo), for testing
    sbatch slurm/finetune.sh --data shards                       # several nodes under Slurm
    tensorboard --logdir runs

Defaults are the d2l recipe: new head Linear(512, 2) with xavier init, SGD with the backbone at lr 5e-5 and
the head at 10x, weight decay 1e-3, global batch 128, 5 epochs. Every flag: `python train.py --help`.
Exit codes: 0 done, 2 usage error, 75 stopped by a preemption signal after saving a checkpoint.
"""

from __future__ import annotations

import itertools
import sys

import torch
from accelerate.utils import gather_object, set_seed

from finetune import EXIT_PREEMPTED, UsageError, checkpoint, cli_main, distributed
from finetune.config import parse_config, save_config
from finetune.data import (DeviceDecoder, DeviceNormalizer, EvalStream, TrainStream, auto_workers,
                           check_shards, load_manifest, make_loader, preprocess_spec)
from finetune.loop import evaluate, train_one_epoch
from finetune.model import build_model, build_optimizer
from finetune.monitor import Monitor


def run(cfg) -> int:
    # ---------------------------------------------------------------------------------------------------
    # Processes, devices, precision
    # ---------------------------------------------------------------------------------------------------
    accelerator = distributed.setup(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    run_dir = cfg.run_dir()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UsageError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes x "
                         f"{cfg.grad_accum} accumulation steps")
    micro_batch = cfg.batch_size // (world * cfg.grad_accum)
    manifest = load_manifest(cfg.data)          # before anything is written: a bad --data leaves no run dir
    who = distributed.describe(accelerator, run_dir)
    monitor = Monitor(run_dir, accelerator.is_main_process)
    monitor.print(f"world_size={who['world_size']} nodes={who['nodes']} devices=[{', '.join(who['devices'])}] "
                  f"backend={who['backend']} precision={who['precision']}")
    set_seed(cfg.seed)
    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True, warn_only=True)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True                  # fixed input sizes: autotune once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------------------------------------------
    # Data: shards from the manifest; every rank runs the same number of steps
    # ---------------------------------------------------------------------------------------------------
    distributed.agree(accelerator, check_shards(manifest) if accelerator.is_local_main_process else None)
    steps_per_epoch = manifest.train.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {manifest.train.num_samples} "
                         f"training samples in {cfg.data}")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(torch.cuda.device_count() or world)
    pin = accelerator.device.type == "cuda"
    train_stream = TrainStream(manifest.train, rank=rank, world_size=world, micro_batch=micro_batch,
                               accum=cfg.grad_accum, steps=steps_per_epoch, image_size=cfg.image_size,
                               seed=cfg.seed, order=cfg.data_order, shuffle_buffer=cfg.shuffle_buffer,
                               decode_on=cfg.decode_on)
    train_loader = make_loader(train_stream, workers, pin)
    eval_loader = make_loader(EvalStream(manifest.test, rank=rank, world_size=world,
                                         batch=cfg.batch_size // world, image_size=cfg.image_size,
                                         limit=cfg.eval_limit), workers, pin)
    expected_test = min(cfg.eval_limit or manifest.test.num_samples, manifest.test.num_samples)
    normalize = (DeviceDecoder(accelerator.device, cfg.channels_last, cfg.image_size) if cfg.decode_on == "device"
                 else DeviceNormalizer(accelerator.device, cfg.channels_last))

    # ---------------------------------------------------------------------------------------------------
    # Model and optimizer
    # ---------------------------------------------------------------------------------------------------
    problem = None
    try:
        model, weights = build_model(cfg, manifest.classes)
    except UsageError as e:       # e.g. offline ImageNet download: make every rank stop with the message
        problem = str(e)
    distributed.agree(accelerator, problem)
    monitor.print(f"weights: {weights}")
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    # Only model and optimizer go through prepare: loaders are already split per rank, and the lr is set
    # per optimizer step by hand (a prepared scheduler steps once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)   # plain keys in state dicts

    # ---------------------------------------------------------------------------------------------------
    # Checkpoints: resume, save, preemption
    # ---------------------------------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    start_epoch, start_step, global_step, history, best_acc = 0, 0, 0, [], -1.0
    carried = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    if not cfg.resume and any(ckpt_dir.glob("ckpt-*.pt")):
        raise UsageError(f"{run_dir} already holds checkpoints of an earlier run: pass --resume auto to continue "
                         f"it, or choose another --output-dir / --name")
    state = checkpoint.find_resume(cfg.resume, ckpt_dir, log=monitor.print)
    if state is not None:
        plain_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"][rank % len(state["rng"])])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["step"]
        history, best_acc = state["metrics"], state["best_acc"]
        if start_step and len(state["train_sums"]) == world:
            carried += torch.tensor(state["train_sums"][rank], dtype=torch.float64, device=carried.device)
        monitor.print(f"resumed from step {global_step} (epoch {start_epoch + 1}, step {start_step})")
        if state["world_size"] != world:
            monitor.print(f"note: the checkpoint was written by {state['world_size']} processes, this run has "
                          f"{world}: training goes on, but the data order differs from an uninterrupted run")
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")

    def save_checkpoint(epoch, step_in_epoch, step, sums, is_best=False):
        rngs = gather_object([checkpoint.rng_state()]) if world > 1 else [checkpoint.rng_state()]
        train_sums = gather_object([sums.tolist()]) if world > 1 else [sums.tolist()]
        if accelerator.is_main_process:
            checkpoint.save(dict(
                model=plain_model.state_dict(), optimizer=optimizer.state_dict(),
                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                rng=rngs, train_sums=train_sums, epoch=epoch, step_in_epoch=step_in_epoch, step=step,
                metrics=history, best_acc=best_acc, config=cfg.to_dict(), world_size=world,
            ), ckpt_dir, cfg.keep_last, is_best)
        accelerator.wait_for_everyone()

    preempt = checkpoint.PreemptionFlag(cfg.preempt_signals)

    # ---------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        train_stream.epoch, train_stream.skip = epoch, start_step * cfg.grad_accum
        batches = itertools.islice(iter(train_loader), (steps_per_epoch - start_step) * cfg.grad_accum)
        result = train_one_epoch(model, optimizer, batches, cfg=cfg, accelerator=accelerator,
                                 normalize=normalize, monitor=monitor, preempt=preempt, epoch=epoch,
                                 start=start_step, steps=steps_per_epoch,
                                 global_step=global_step, sums=carried, on_save=save_checkpoint)
        global_step = result["global_step"]
        if result["preempted"]:
            save_checkpoint(epoch, result["step_in_epoch"], global_step, carried)
            monitor.print(f"{preempt.signal_name or 'a preemption signal'} received: checkpoint saved at step "
                          f"{global_step}; exiting with {EXIT_PREEMPTED} (resume with --resume auto)")
            return EXIT_PREEMPTED
        ev = evaluate(plain_model, eval_loader, accelerator=accelerator, normalize=normalize)
        if ev["test_samples"] != expected_test:
            raise RuntimeError(f"evaluated {ev['test_samples']} test samples, expected {expected_test}")
        record = dict(epoch=epoch + 1, step=global_step, **{k: v for k, v in result.items()
                                                             if k not in ("preempted", "step_in_epoch", "global_step")},
                      **ev)
        history.append(record)
        monitor.epoch_end(record, optimizer, global_step, who["devices"])
        is_best = ev["test_acc"] > best_acc
        best_acc = max(best_acc, ev["test_acc"])
        monitor.write_metrics(dict(epochs=history, world_size=world, weights=weights))
        carried.zero_()
        start_step = 0
        save_checkpoint(epoch + 1, 0, global_step, carried, is_best)
        if distributed.any_rank(preempt.requested, accelerator.device):   # asked to stop during eval
            monitor.print(f"preemption signal received: checkpoint saved at step {global_step}; exiting with "
                          f"{EXIT_PREEMPTED}")
            return EXIT_PREEMPTED

    # ---------------------------------------------------------------------------------------------------
    # Results: metrics.json, hparams, model.pt for predict.py
    # ---------------------------------------------------------------------------------------------------
    final = dict(history[-1]) if history else {}
    monitor.write_metrics(dict(epochs=history, final=final, world_size=world, weights=weights))
    monitor.hparams({k: v for k, v in cfg.to_dict().items() if k not in ("data", "output_dir")},
                    {"final/test_acc": final.get("test_acc", 0.0), "final/train_acc": final.get("train_acc", 0.0),
                     "final/train_loss": final.get("train_loss", 0.0)})
    if accelerator.is_main_process:
        checkpoint.atomic_save(dict(state_dict=plain_model.state_dict(), classes=manifest.classes,
                                    arch="resnet18", preprocess=preprocess_spec(cfg.image_size),
                                    weights=weights, test_acc=final.get("test_acc")),
                               run_dir / "model.pt")
    distributed.write_rank_file(run_dir, {**who["me"], "final_param_sha256": distributed.param_digest(plain_model)})
    monitor.close()
    monitor.print(f"run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir / 'tb'}")
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    # Bad flags: argparse prints usage + one line, exit 2. A UsageError: one line, exit 2 (cli_main).
    return cli_main("train.py", lambda: run_explaining_dead_peers(parse_config(argv)))


def run_explaining_dead_peers(cfg) -> int:
    try:
        return run(cfg)
    except Exception as e:  # noqa: BLE001 -- a dead peer is an event to explain, not a traceback to dump
        message = distributed.collective_failure(e)
        if message is None:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
