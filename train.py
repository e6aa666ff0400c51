"""Fine-tune an ImageNet-pretrained backbone (d2l: ResNet-18; any torchvision or timm classifier with --arch) on
hotdog / not-hotdog (Dive into Deep Learning, "Fine-Tuning"),
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
from dataclasses import dataclass

from finetune import EXIT_PREEMPTED, UsageError, cli_main
from finetune.config import Config, check_names, parse_config, parse_or_exit, save_config

# Parse before importing torch (seconds): --help and usage errors answer at once.
CONFIG = parse_or_exit() if __name__ == "__main__" else None

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from data_prep.remote import redact_url  # noqa: E402
from finetune import dali, distributed, launcher, simulated_delay  # noqa: E402
from finetune.arch import describe_preprocessing, preprocessing  # noqa: E402
from finetune.checkpoint import Checkpointer, PreemptionFlag, TrainState, atomic_save, run_identity  # noqa: E402
from finetune.data import (DeviceDecoder, DeviceNormalizer, EvalStream, Manifest, TrainStream, auto_workers,
                           check_shards, load_manifest, make_loader, train_stream_for)  # noqa: E402
from finetune.loop import class_weights, evaluate, make_ema, train_one_epoch  # noqa: E402
from finetune.mixing import train_normalizer  # noqa: E402
from finetune.model import build_model  # noqa: E402
from finetune.recipe import batch_note, build_optimizer, steps_per_epoch  # noqa: E402
from finetune.monitor import Monitor  # noqa: E402
from finetune.remote import stage_data  # noqa: E402
from finetune.tracker_checks import check_trackers  # noqa: E402
from finetune.trackers import parse_log_with  # noqa: E402


def run(cfg: Config) -> int:
    """The steps of a run, in order. Each returns what the later ones need."""
    # First: a preemption signal during start-up (model download, checkpoint load) must not kill the job.
    preempt = PreemptionFlag(cfg.preempt_signals)
    check_names(cfg)
    with distributed.leave_nothing_if_refused(cfg.run_dir()):    # a refused start: the directory as it was
        job = set_up(cfg)
        data = make_data(job)
        normalize = make_normalizer(job)
        model, optimizer, weights = build_model_and_optimizer(job)
        ema = make_ema(job.accelerator.unwrap_model(model, keep_torch_compile=False), cfg.ema_decay)
        splits = [job.manifest.train, job.manifest.test] + ([job.manifest.val] if job.manifest.val else [])
        checkpointer = Checkpointer(job.accelerator, model, optimizer, job.run_dir / "checkpoints", cfg.keep_last,
                                    cfg.to_dict(), run_identity(job.manifest.classes, [s for x in splits for s in x.shards]),
                                    ema=ema)
        state = resume(job, checkpointer)
    if fit(job, data, model, optimizer, normalize, checkpointer, state, weights, preempt) == EXIT_PREEMPTED:
        job.monitor.close()       # flush TensorBoard, end the tracker runs (the requeued job continues them)
        job.accelerator.end_training()     # destroys the process group on this exit path too
        return EXIT_PREEMPTED
    finish(job, checkpointer, state, weights)
    return 0


# ------------------------------------------------------------------------------------------------------
# Set up: processes, devices, precision, the manifest, the monitor
# ------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """What every step of a run needs: the config, the processes, the data contract and the monitor."""
    cfg: Config
    accelerator: Accelerator
    manifest: Manifest
    monitor: Monitor
    who: dict                   # distributed.describe(): this rank, and every rank's device
    preprocess: dict            # the weights' mean/std and eval resize/crop (finetune.arch.preprocessing)

    @property
    def run_dir(self):
        return self.cfg.run_dir()

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def set_up(cfg: Config) -> Job:
    launch = launcher.decide(cfg)      # accelerate's own mixed_precision / dynamo_backend vs --precision / --compile
    cfg.precision, cfg.compile = launch.precision, launch.dynamo_backend != "no"
    accelerator = distributed.setup(cfg, dynamo_backend=launch.dynamo_backend)
    # Tracker settings and trackers.json, on every rank (all stop alike), before any data or model work.
    check_trackers(parse_log_with(cfg.log_with), cfg.run_dir(), print if accelerator.is_main_process else None)
    world = accelerator.num_processes
    if cfg.per_gpu_batch:       # a throughput run: the global batch follows the number of processes
        cfg.batch_size = cfg.per_gpu_batch * world
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UsageError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes x "
                         f"{cfg.grad_accum} accumulation steps")
    manifest = load_manifest(stage_data(cfg, accelerator))   # remote --data: staged (finetune/remote.py)
    if cfg.patience and manifest.val is None:
        raise UsageError(f"--patience needs a val split, and {redact_url(cfg.data)} has none: re-run data_prep "
                         f"with --val-fraction F (e.g. 0.1), or drop --patience")
    distributed.lock_run_dir(accelerator, cfg.run_dir())     # first write into the run directory
    who = distributed.describe(accelerator, cfg.run_dir())
    monitor = Monitor(cfg.run_dir(), accelerator.is_main_process, parse_log_with(cfg.log_with))
    for note in launch.notes:
        monitor.print(note)
    monitor.print(f"world_size={who['world_size']} nodes={who['nodes']} devices=[{', '.join(who['devices'])}] "
                  f"backend={who['backend']} precision={who['precision']}")
    preprocess = preprocessing(cfg.arch, cfg.image_size)
    monitor.print(describe_preprocessing(preprocess))
    set_seed(cfg.seed)
    distributed.configure_backends(accelerator.device, cfg.debug)
    return Job(cfg, accelerator, manifest, monitor, who, preprocess)


# ------------------------------------------------------------------------------------------------------
# Data: shards from the manifest; every rank runs the same number of steps
# ------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train_stream: TrainStream
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    steps: int                  # optimizer steps per epoch
    expected_test: int          # test samples an evaluation must count
    val_loader: torch.utils.data.DataLoader | None = None   # the manifest's val split, if it has one
    expected_val: int = 0
    class_weight: torch.Tensor | None = None                # --class-balance loss
    _running: tuple = (None, None)                          # (the train loader's iterator, the (epoch, step) it is at)

    def batches(self, epoch: int, start: int, accum: int):
        """The loader batches of `epoch` from optimizer step `start` on (a resumed epoch skips the others). One
        iterator serves epoch after epoch (the streams are `continuous`): the loader workers are forked once
        per run, not at every epoch (each epoch still starts its own shuffle buffers, as before); a new
        iterator starts only where the running one is not."""
        iterator, at = self._running
        if at != (epoch, start):
            self.train_stream.epoch, self.train_stream.skip = epoch, start * accum
            iterator = iter(self.train_loader)
        self._running = (iterator, None)
        return self._take(iterator, (self.steps - start) * accum, epoch)

    def _take(self, iterator, n: int, epoch: int):
        for k, batch in enumerate(itertools.islice(iterator, n), 1):
            if k == n:                  # the epoch was consumed whole: the iterator stands at the next one
                self._running = (iterator, (epoch + 1, 0))
            yield batch


def make_data(job: Job) -> Data:
    cfg, acc, manifest = job.cfg, job.accelerator, job.manifest
    world, rank = acc.num_processes, acc.process_index
    distributed.agree(acc, check_shards(manifest) if acc.is_local_main_process else None)
    steps = steps_per_epoch(manifest.train.num_samples, cfg.batch_size,
                            cfg.epoch_steps if cfg.data_order == "random" else "floor")
    if steps == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {manifest.train.num_samples} "
                         f"training samples in {redact_url(cfg.data)}")
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if note := batch_note(manifest.train.num_samples, cfg.batch_size, steps):
        job.monitor.print(note)
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(torch.cuda.device_count() or world)
    pin = acc.device.type == "cuda"
    if cfg.loader == "dali":    # index files once per node (the local main process), then every rank's pipeline
        distributed.agree(acc, dali.build_indexes([manifest.train]) if acc.is_local_main_process else None)
        train_stream = dali.make_train_loader(job, manifest.train, steps=steps, threads=workers)
    else:
        train_stream = train_stream_for(cfg, manifest.train, rank=rank, world_size=world,
                                        micro_batch=cfg.batch_size // (world * cfg.grad_accum),
                                        accum=cfg.grad_accum, steps=steps, image_size=cfg.image_size,
                                        seed=cfg.seed, order=cfg.data_order, shuffle_buffer=cfg.shuffle_buffer,
                                        decode_on=cfg.decode_on, augment_with=cfg.augment_with)
        train_stream.continuous, train_stream.augment_policy = True, cfg.augment_policy

    def eval_loader(split):     # each sample once over all ranks; --eval-limit caps test and val alike
        return make_loader(EvalStream(split, rank=rank, world_size=world, batch=cfg.batch_size // world,
                                      preprocess=job.preprocess, limit=cfg.eval_limit), workers, pin)

    def expected(split):
        return min(cfg.eval_limit or split.num_samples, split.num_samples)

    val = manifest.val
    train_loader = train_stream if cfg.loader == "dali" else make_loader(train_stream, workers, pin)
    return Data(train_stream, train_loader, eval_loader(manifest.test), steps,
                expected(manifest.test), eval_loader(val) if val else None, expected(val) if val else 0,
                class_weight=class_weights(manifest.train.class_counts, cfg.class_balance, acc.device))


def make_normalizer(job: Job):
    """uint8 batches on the host -> normalised floats on the device (decoding them there first for
    --decode-on device)."""
    cfg, device = job.cfg, job.accelerator.device
    stats = dict(mean=job.preprocess["mean"], std=job.preprocess["std"])
    if cfg.loader == "dali":    # DALI's batches arrive normalised; evaluation's uint8 ones are normalised here
        return dali.FloatPassNormalizer(device, cfg.channels_last, **stats)
    return (DeviceDecoder(device, cfg.channels_last, cfg.image_size, **stats) if cfg.decode_on == "device"
            else DeviceNormalizer(device, cfg.channels_last, **stats))


# ------------------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------------------
def build_model_and_optimizer(job: Job):
    cfg, accelerator = job.cfg, job.accelerator
    problem = None
    try:
        model, weights = build_model(cfg, job.manifest.classes)
    except UsageError as e:       # e.g. offline ImageNet download: make every rank stop with the message
        problem = str(e)
    distributed.agree(accelerator, problem)
    job.monitor.print(f"weights: {weights}")
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    # Only model and optimizer go through prepare: loaders are already split per rank, and the lr is set
    # per optimizer step by hand (a prepared scheduler steps once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, weights


# ------------------------------------------------------------------------------------------------------
# Resume, fit
# ------------------------------------------------------------------------------------------------------
def resume(job: Job, checkpointer: Checkpointer) -> TrainState:
    state = checkpointer.restore(job.cfg.resume, log=job.monitor.print)
    if job.accelerator.is_main_process:
        save_config(job.cfg, job.run_dir / "config.yaml")
    job.monitor.open(state.global_step, job.cfg.to_dict())      # trackers start where the checkpoint stands
    distributed.write_rank_file(job.run_dir, job.who["me"])     # after every refusal: the start is accepted
    simulated_delay("FINETUNE_TEST_STARTUP_DELAY_S")    # tests: a slow start-up (a model download) to signal into
    return state


def fit(job: Job, data: Data, model, optimizer, normalize, checkpointer: Checkpointer, state: TrainState,
        weights: str, preempt: PreemptionFlag) -> int:
    """Train the remaining epochs, evaluating and checkpointing after each, until --epochs or --patience ends
    the run. Returns 0, or EXIT_PREEMPTED after saving a checkpoint when a preemption signal arrived."""
    cfg, acc, monitor = job.cfg, job.accelerator, job.monitor
    if state.epoch < cfg.epochs and preempt.stop_now(acc.device):   # a signal during start-up: nothing new
        monitor.print(f"{preempt.signal_name or 'a preemption signal'} received during start-up: nothing "
                      f"trained yet, nothing to save; exiting with {EXIT_PREEMPTED} (resume with --resume auto)")
        return EXIT_PREEMPTED
    while state.epoch < cfg.epochs and not state.stopped_early:
        metrics = train_one_epoch(model, optimizer, data.batches(state.epoch, state.step_in_epoch, cfg.grad_accum),
                                  state, steps=data.steps, cfg=cfg, accelerator=acc,
                                  normalize=train_normalizer(normalize, cfg, len(job.manifest.classes),
                                                             state.global_step),
                                  monitor=monitor, preempt=preempt, checkpointer=checkpointer,
                                  ema=checkpointer.ema, class_weight=data.class_weight)
        if preempt.stopping:
            checkpointer.save(state)
            monitor.print(f"{preempt.signal_name or 'a preemption signal'} received: checkpoint saved at step "
                          f"{state.global_step}; exiting with {EXIT_PREEMPTED} (resume with --resume auto)")
            return EXIT_PREEMPTED
        ev = evaluate_all_ranks_alike(job, checkpointer, data, normalize)
        record = dict(epoch=state.epoch + 1, step=state.global_step, **metrics, **ev)
        if (peak := distributed.peak_gpu_memory_gib(acc.device)) is not None:
            record["peak_gpu_mem_gib"] = peak
        is_best = state.end_epoch(record)
        state.stopped_early = out_of_patience(job, state)
        monitor.epoch_end(record, optimizer, state.global_step, job.who["devices"])
        monitor.class_metrics(record, job.manifest.classes, state.global_step)
        monitor.write_metrics(dict(epochs=state.history, world_size=job.world, weights=weights))
        checkpointer.save(state, is_best)
        if preempt.stop_now(acc.device):   # asked to stop during eval
            monitor.print(f"preemption signal received: checkpoint saved at step {state.global_step}; exiting "
                          f"with {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
    return 0


def out_of_patience(job: Job, state: TrainState) -> bool:
    """--patience: stop when val accuracy has not improved for that many epochs. The counter comes from
    all-reduced val sums, so it is the same everywhere; the any-rank vote makes sure no rank stops alone."""
    cfg = job.cfg
    stop = distributed.any_rank(bool(cfg.patience) and state.epochs_since_best >= cfg.patience,
                                job.accelerator.device)
    if stop and state.epoch < cfg.epochs:
        job.monitor.print(f"early stop after epoch {state.epoch}: val acc has not improved for "
                          f"{state.epochs_since_best} epoch(s) (--patience {cfg.patience}); best epoch "
                          f"{state.best_epoch}, val acc {state.best_acc:.3f}")
    return stop and state.epoch < cfg.epochs


def evaluate_all_ranks_alike(job: Job, checkpointer: Checkpointer, data: Data, normalize) -> dict:
    """Every rank evaluates (and later saves) rank 0's model: its BatchNorm statistics first, then the
    exact-once pass over the test set, and the val set if there is one, with a patient timeout (a first
    evaluation may compile). With --ema-decay, the EMA weights too (keys ema_test_*, ema_val_*)."""
    models = [("", checkpointer.model)] + ([("ema_", checkpointer.ema.module)] if checkpointer.ema else [])
    splits = [("test", data.eval_loader, data.expected_test)]
    if data.val_loader is not None:
        splits.append(("val", data.val_loader, data.expected_val))
    record = dict(eval_time=0.0)
    for prefix, model in models:
        distributed.sync_buffers(model, job.world)
        for split, loader, expected in splits:
            with distributed.patient():
                ev = evaluate(model, loader, accelerator=job.accelerator, normalize=normalize,
                              num_classes=len(job.manifest.classes), split=prefix + split, tta=job.cfg.tta)
            if ev[f"{prefix}{split}_samples"] != expected:
                raise RuntimeError(f"evaluated {ev[f'{prefix}{split}_samples']} {split} samples, expected {expected}")
            record["eval_time"] += ev.pop("eval_time")
            record.update(ev)
    return record


# ------------------------------------------------------------------------------------------------------
# Finish: metrics.json, hparams, model.pt for predict.py
# ------------------------------------------------------------------------------------------------------
def finish(job: Job, checkpointer: Checkpointer, state: TrainState, weights: str) -> None:
    cfg, monitor, run_dir, plain_model = job.cfg, job.monitor, job.run_dir, checkpointer.model
    chosen, final, model_state, ema_state = choose_model(job, checkpointer, state)
    last = dict(state.history[-1]) if state.history else {}
    monitor.write_metrics(dict(epochs=state.history, final=final, chosen=chosen, last=last, world_size=job.world,
                               weights=weights))
    monitor.hparams({k: v for k, v in cfg.to_dict().items() if k not in ("data", "output_dir")},
                    {"final/test_acc": final.get("test_acc", 0.0), "final/train_acc": final.get("train_acc", 0.0),
                     "final/train_loss": final.get("train_loss", 0.0),
                     "final/test_balanced_acc": final.get("test_balanced_acc", 0.0),
                     **({"final/val_acc": final["val_acc"]} if "val_acc" in final else {})})
    if job.accelerator.is_main_process:
        atomic_save(dict(state_dict=model_state, ema_state_dict=ema_state, classes=job.manifest.classes,
                         arch=cfg.arch, preprocess=job.preprocess, weights=weights, test_acc=final.get("test_acc"),
                         ema_test_acc=final.get("ema_test_acc"), chosen=chosen, tta=cfg.tta),
                    run_dir / "model.pt")
    distributed.write_rank_file(run_dir, {**job.who["me"], "epochs_trained": state.epoch,
                                          "stopped_early": state.stopped_early,
                                          "final_param_sha256": distributed.param_digest(plain_model),
                                          "final_buffer_sha256": distributed.buffer_digest(plain_model)})
    monitor.close()
    monitor.print(f"run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir / 'tb'}")
    job.accelerator.end_training()


def choose_model(job: Job, checkpointer: Checkpointer, state: TrainState):
    """The model that model.pt ships, chosen on VAL (never on test): best.pt's weights when there is a val
    split, else the last epoch's. Returns (chosen: what and why, its epoch's record, its state dict and
    its EMA state dict or None); the state dicts on the main process only. Prints the choice in one line."""
    main, ema = job.accelerator.is_main_process, checkpointer.ema
    best = job.run_dir / "checkpoints" / "best.pt"
    if state.best_epoch and best.exists():
        record = dict(state.history[state.best_epoch - 1])
        chosen = dict(checkpoint="best.pt", epoch=state.best_epoch, on="val_acc", val_acc=state.best_acc)
        job.monitor.print(f"model.pt = best.pt, epoch {state.best_epoch} of {len(state.history)}, chosen on val "
                          f"acc {state.best_acc:.3f}; its test acc {record['test_acc']:.3f} (last epoch's: "
                          f"{state.history[-1]['test_acc']:.3f})")
        saved = torch.load(best, map_location="cpu", weights_only=True) if main else {}
        ema_state = ({k[len("module."):]: v for k, v in saved["ema"].items() if k.startswith("module.")}
                     if main and saved.get("ema") else None)
        return chosen, record, saved.get("model"), ema_state
    why = ("no val split in --data (data_prep --val-fraction F makes one)" if job.manifest.val is None
           else "no epoch finished")
    chosen = dict(checkpoint="last", epoch=len(state.history), on=None, why=why)
    job.monitor.print(f"model.pt = the last epoch's weights, no best.pt: {why}")
    return (chosen, dict(state.history[-1]) if state.history else {},
            checkpointer.model.state_dict() if main else None,
            ema.module.state_dict() if main and ema is not None else None)


def main(argv: list[str] | None = None, cfg: Config | None = None) -> int:
    # Bad flags: argparse prints usage + one line, exit 2. A UsageError: one line, exit 2 (cli_main).
    code = cli_main("train.py", lambda: run_explaining_dead_peers(cfg or parse_config(argv)))
    if code == 2:                   # a usage error, found alike on every rank after set-up: leave the group cleanly
        distributed.shut_down()
    return code


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
    sys.exit(main(cfg=CONFIG))
