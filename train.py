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
from dataclasses import dataclass, replace

from common.errors import UsageError, cli_main
from finetune import EXIT_PREEMPTED
from finetune.config import Config, check_names, parse_config, parse_or_exit, save_config

# Parse before importing torch (seconds): --help and usage errors answer at once.
CONFIG = parse_or_exit() if __name__ == "__main__" else None

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from data_prep.remote_io import redact_url  # noqa: E402
from finetune import distributed, launcher, precision, rundir  # noqa: E402
from finetune.arch import describe_preprocessing, preprocessing  # noqa: E402
from finetune.checkpoint import Checkpointer, TrainState, atomic_save, run_identity  # noqa: E402
from finetune.context import StepContext  # noqa: E402
from finetune.data import dali  # noqa: E402
from finetune.data.device_decode import DeviceDecoder  # noqa: E402
from finetune.data.manifest import Manifest, check_shards, load_manifest  # noqa: E402
from finetune.data.streams import EvalStream, TrainStream, auto_workers, make_loader, train_stream_for  # noqa: E402
from finetune.data.transforms import DeviceNormalizer  # noqa: E402
from finetune.loop import class_weights, evaluate, make_ema, train_one_epoch  # noqa: E402
from finetune.mixing import train_normalizer  # noqa: E402
from finetune.model import build_model  # noqa: E402
from finetune.recipe import batch_note, build_optimizer, steps_per_epoch  # noqa: E402
from finetune.monitor import Monitor  # noqa: E402
from finetune.preempt import PreemptionFlag  # noqa: E402
from finetune.staging import stage_data  # noqa: E402
from finetune.tracker_checks import check_trackers  # noqa: E402
from finetune.trackers import parse_log_with  # noqa: E402


def train(cfg: Config) -> int:
    """The steps of a run, in order. Each returns what the later ones need."""
    # First: a preemption signal during start-up (model download, checkpoint load) must not kill the job.
    preempt = PreemptionFlag(cfg.preempt_signals)
    check_names(cfg)
    with rundir.leave_nothing_if_refused(cfg.run_dir()):    # a refused start: the directory as it was
        run = set_up(cfg, preempt)
        data = make_data(run)
        ctx, weights = make_step_context(run, data)
        splits = [run.manifest.train, run.manifest.test] + ([run.manifest.val] if run.manifest.val else [])
        checkpointer = Checkpointer(ctx, run.run_dir / "checkpoints",
                                    run_identity(run.manifest.classes, [s for x in splits for s in x.shards]))
        state = resume(run, checkpointer)
    if fit(run, data, ctx, checkpointer, state, weights) == EXIT_PREEMPTED:
        run.monitor.close()       # flush TensorBoard, end the tracker runs (the requeued job continues them)
        run.accelerator.end_training()     # destroys the process group on this exit path too
        return EXIT_PREEMPTED
    finish(run, checkpointer, state, weights)
    return 0


# ------------------------------------------------------------------------------------------------------
# Set up: processes, devices, precision, the manifest, the monitor
# ------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One process's run context (not a Slurm job): what every step of train() needs -- the config, the
    processes, the data contract, the monitor and the preemption flag."""
    cfg: Config
    accelerator: Accelerator
    manifest: Manifest
    monitor: Monitor
    who: dict                   # distributed.describe(): this rank, and every rank's device
    preprocess: dict            # the weights' mean/std and eval resize/crop (finetune.arch.preprocessing)
    preempt: PreemptionFlag     # set by --preempt-signals' handler (installed before set-up)

    @property
    def run_dir(self):
        return self.cfg.run_dir()

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def set_up(cfg: Config, preempt: PreemptionFlag) -> Run:
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
    manifest = load_manifest(stage_data(cfg, accelerator))   # remote --data: staged (finetune/staging.py)
    if cfg.patience and manifest.val is None:
        raise UsageError(f"--patience needs a val split, and {redact_url(cfg.data)} has none: re-run data_prep "
                         f"with --val-fraction F (e.g. 0.1), or drop --patience")
    rundir.lock_run_dir(accelerator, cfg.run_dir())     # first write into the run directory
    who = distributed.describe(accelerator)
    monitor = Monitor(cfg.run_dir(), accelerator.is_main_process, parse_log_with(cfg.log_with))
    for note in launch.notes:
        monitor.print(note)
    monitor.print(f"world_size={who['world_size']} nodes={who['nodes']} devices=[{', '.join(who['devices'])}] "
                  f"backend={who['backend']} precision={who['precision']}")
    preprocess = preprocessing(cfg.arch, cfg.image_size)
    monitor.print(describe_preprocessing(preprocess))
    set_seed(cfg.seed)
    precision.configure_backends(accelerator.device, cfg.debug)
    return Run(cfg, accelerator, manifest, monitor, who, preprocess, preempt)


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


def make_data(run: Run) -> Data:
    cfg, acc, manifest = run.cfg, run.accelerator, run.manifest
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
        run.monitor.print(note)
    workers = cfg.workers if cfg.workers >= 0 else auto_workers(torch.cuda.device_count() or world)
    pin = acc.device.type == "cuda"
    if cfg.loader == "dali":    # index files once per node (the local main process), then every rank's pipeline
        distributed.agree(acc, dali.build_indexes([manifest.train]) if acc.is_local_main_process else None)
        train_stream = dali.make_train_loader(run, manifest.train, steps=steps, threads=workers)
    else:
        train_stream = train_stream_for(cfg, manifest.train, rank=rank, world_size=world,
                                        micro_batch=cfg.batch_size // (world * cfg.grad_accum),
                                        accum=cfg.grad_accum, steps=steps, image_size=cfg.image_size,
                                        seed=cfg.seed, order=cfg.data_order, shuffle_buffer=cfg.shuffle_buffer,
                                        decode_on=cfg.decode_on, augment_with=cfg.augment_with)
        train_stream.continuous, train_stream.augment_policy = True, cfg.augment_policy

    def eval_loader(split):     # each sample once over all ranks; --eval-limit caps test and val alike
        return make_loader(EvalStream(split, rank=rank, world_size=world, batch=cfg.batch_size // world,
                                      preprocess=run.preprocess, limit=cfg.eval_limit), workers, pin)

    def expected(split):
        return min(cfg.eval_limit or split.num_samples, split.num_samples)

    val = manifest.val
    train_loader = train_stream if cfg.loader == "dali" else make_loader(train_stream, workers, pin)
    return Data(train_stream, train_loader, eval_loader(manifest.test), steps,
                expected(manifest.test), eval_loader(val) if val else None, expected(val) if val else 0,
                class_weight=class_weights(manifest.train.class_counts, cfg.class_balance, acc.device))


def make_normalizer(run: Run):
    """uint8 batches on the host -> normalised floats on the device (decoding them there first for
    --decode-on device)."""
    cfg, device = run.cfg, run.accelerator.device
    stats = dict(mean=run.preprocess["mean"], std=run.preprocess["std"])
    if cfg.loader == "dali":    # DALI's batches arrive normalised; evaluation's uint8 ones are normalised here
        return dali.FloatPassNormalizer(device, cfg.channels_last, **stats)
    return (DeviceDecoder(device, cfg.channels_last, cfg.image_size, **stats) if cfg.decode_on == "device"
            else DeviceNormalizer(device, cfg.channels_last, **stats))


# ------------------------------------------------------------------------------------------------------
# Model and optimizer, and with them everything a training step needs
# ------------------------------------------------------------------------------------------------------
def make_step_context(run: Run, data: Data) -> tuple[StepContext, str]:
    """The StepContext of finetune.loop (model, optimizer, normaliser, EMA, loss weights), and the line that
    says where the initial weights came from."""
    model, optimizer, weights = build_model_and_optimizer(run)
    ema = make_ema(run.accelerator.unwrap_model(model, keep_torch_compile=False), run.cfg.ema_decay)
    return StepContext(model, optimizer, run.accelerator, run.cfg, make_normalizer(run), run.monitor, ema=ema,
                       class_weight=data.class_weight), weights


def build_model_and_optimizer(run: Run):
    cfg, accelerator = run.cfg, run.accelerator
    problem = None
    try:
        model, weights = build_model(cfg, run.manifest.classes)
    except UsageError as e:       # e.g. offline ImageNet download: make every rank stop with the message
        problem = str(e)
    distributed.agree(accelerator, problem)
    run.monitor.print(f"weights: {weights}")
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
def resume(run: Run, checkpointer: Checkpointer) -> TrainState:
    state = checkpointer.restore(run.cfg.resume, log=run.monitor.print)
    if run.accelerator.is_main_process:
        save_config(run.cfg, run.run_dir / "config.yaml")
    run.monitor.open(state.global_step, run.cfg.to_dict())      # trackers start where the checkpoint stands
    rundir.write_rank_file(run.run_dir, run.who["me"])     # after every refusal: the start is accepted
    return state


def fit(run: Run, data: Data, ctx: StepContext, checkpointer: Checkpointer, state: TrainState,
        weights: str) -> int:
    """Train the remaining epochs, evaluating and checkpointing after each, until --epochs or --patience ends
    the run. Returns 0, or EXIT_PREEMPTED after saving a checkpoint when a preemption signal arrived."""
    cfg, acc, monitor, preempt = run.cfg, run.accelerator, run.monitor, run.preempt
    if state.epoch < cfg.epochs and preempt.stop_now(acc.device):   # a signal during start-up: nothing new
        monitor.print(f"{preempt.signal_name or 'a preemption signal'} received during start-up: nothing "
                      f"trained yet, nothing to save; exiting with {EXIT_PREEMPTED} (resume with --resume auto)")
        return EXIT_PREEMPTED
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch_ctx = replace(ctx, normalize=train_normalizer(ctx.normalize, cfg, len(run.manifest.classes),
                                                                        state.global_step))   # --mixup/--cutmix
        metrics = train_one_epoch(epoch_ctx, data.batches(state.epoch, state.step_in_epoch, cfg.grad_accum), state,
                                  steps=data.steps, preempt=preempt, checkpointer=checkpointer)
        if preempt.stopping:
            checkpointer.save(state)
            monitor.print(f"{preempt.signal_name or 'a preemption signal'} received: checkpoint saved at step "
                          f"{state.global_step}; exiting with {EXIT_PREEMPTED} (resume with --resume auto)")
            return EXIT_PREEMPTED
        ev = evaluate_all_ranks_alike(run, checkpointer, data, ctx.normalize)
        record = dict(epoch=state.epoch + 1, step=state.global_step, **metrics, **ev)
        if (peak := distributed.peak_gpu_memory_gib(acc.device)) is not None:
            record["peak_gpu_mem_gib"] = peak
        is_best = state.end_epoch(record)
        state.stopped_early = out_of_patience(run, state)
        monitor.epoch_end(record, ctx.optimizer, state.global_step, run.who["devices"])
        monitor.class_metrics(record, run.manifest.classes, state.global_step)
        monitor.write_metrics(dict(epochs=state.history, world_size=run.world, weights=weights))
        checkpointer.save(state, is_best)
        if preempt.stop_now(acc.device):   # asked to stop during eval
            monitor.print(f"preemption signal received: checkpoint saved at step {state.global_step}; exiting "
                          f"with {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
    return 0


def out_of_patience(run: Run, state: TrainState) -> bool:
    """--patience: stop when val accuracy has not improved for that many epochs. The counter comes from
    all-reduced val sums, so it is the same everywhere; the any-rank vote makes sure no rank stops alone."""
    cfg = run.cfg
    stop = distributed.any_rank(bool(cfg.patience) and state.epochs_since_best >= cfg.patience,
                                run.accelerator.device)
    if stop and state.epoch < cfg.epochs:
        run.monitor.print(f"early stop after epoch {state.epoch}: val acc has not improved for "
                          f"{state.epochs_since_best} epoch(s) (--patience {cfg.patience}); best epoch "
                          f"{state.best_epoch}, val acc {state.best_acc:.3f}")
    return stop and state.epoch < cfg.epochs


def evaluate_all_ranks_alike(run: Run, checkpointer: Checkpointer, data: Data, normalize) -> dict:
    """Every rank evaluates (and later saves) rank 0's model: its BatchNorm statistics first, then the
    exact-once pass over the test set, and the val set if there is one, with a patient timeout (a first
    evaluation may compile). With --ema-decay, the EMA weights too (keys ema_test_*, ema_val_*)."""
    models = [("", checkpointer.model)] + ([("ema_", checkpointer.ema.module)] if checkpointer.ema else [])
    splits = [("test", data.eval_loader, data.expected_test)]
    if data.val_loader is not None:
        splits.append(("val", data.val_loader, data.expected_val))
    record = dict(eval_time=0.0)
    for prefix, model in models:
        distributed.sync_buffers(model, run.world)
        for split, loader, expected in splits:
            with distributed.patient():
                ev = evaluate(model, loader, accelerator=run.accelerator, normalize=normalize,
                              num_classes=len(run.manifest.classes), split=prefix + split, tta=run.cfg.tta)
            if ev[f"{prefix}{split}_samples"] != expected:
                raise RuntimeError(f"evaluated {ev[f'{prefix}{split}_samples']} {split} samples, expected {expected}")
            record["eval_time"] += ev.pop("eval_time")
            record.update(ev)
    return record


# ------------------------------------------------------------------------------------------------------
# Finish: metrics.json, hparams, model.pt for predict.py
# ------------------------------------------------------------------------------------------------------
def finish(run: Run, checkpointer: Checkpointer, state: TrainState, weights: str) -> None:
    cfg, monitor, run_dir, plain_model = run.cfg, run.monitor, run.run_dir, checkpointer.model
    chosen, final, model_state, ema_state = choose_model(run, checkpointer, state)
    last = dict(state.history[-1]) if state.history else {}
    monitor.write_metrics(dict(epochs=state.history, final=final, chosen=chosen, last=last, world_size=run.world,
                               weights=weights))
    monitor.hparams({k: v for k, v in cfg.to_dict().items() if k not in ("data", "output_dir")},
                    {"final/test_acc": final.get("test_acc", 0.0), "final/train_acc": final.get("train_acc", 0.0),
                     "final/train_loss": final.get("train_loss", 0.0),
                     "final/test_balanced_acc": final.get("test_balanced_acc", 0.0),
                     **({"final/val_acc": final["val_acc"]} if "val_acc" in final else {})})
    if run.accelerator.is_main_process:
        atomic_save(dict(state_dict=model_state, ema_state_dict=ema_state, classes=run.manifest.classes,
                         arch=cfg.arch, preprocess=run.preprocess, weights=weights, test_acc=final.get("test_acc"),
                         ema_test_acc=final.get("ema_test_acc"), chosen=chosen, tta=cfg.tta),
                    run_dir / "model.pt")
    rundir.write_rank_file(run_dir, {**run.who["me"], "epochs_trained": state.epoch,
                                          "stopped_early": state.stopped_early,
                                          "final_param_sha256": distributed.param_digest(plain_model),
                                          "final_buffer_sha256": distributed.buffer_digest(plain_model)})
    monitor.close()
    monitor.print(f"run directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir / 'tb'}")
    run.accelerator.end_training()


def choose_model(run: Run, checkpointer: Checkpointer, state: TrainState):
    """The model that model.pt ships, chosen on VAL (never on test): best.pt's weights when there is a val
    split, else the last epoch's. Returns (chosen: what and why, its epoch's record, its state dict and
    its EMA state dict or None); the state dicts on the main process only. Prints the choice in one line."""
    main, ema = run.accelerator.is_main_process, checkpointer.ema
    best = run.run_dir / "checkpoints" / "best.pt"
    if state.best_epoch and best.exists():
        record = dict(state.history[state.best_epoch - 1])
        chosen = dict(checkpoint="best.pt", epoch=state.best_epoch, on="val_acc", val_acc=state.best_acc)
        run.monitor.print(f"model.pt = best.pt, epoch {state.best_epoch} of {len(state.history)}, chosen on val "
                          f"acc {state.best_acc:.3f}; its test acc {record['test_acc']:.3f} (last epoch's: "
                          f"{state.history[-1]['test_acc']:.3f})")
        saved = torch.load(best, map_location="cpu", weights_only=True) if main else {}
        ema_state = ({k[len("module."):]: v for k, v in saved["ema"].items() if k.startswith("module.")}
                     if main and saved.get("ema") else None)
        return chosen, record, saved.get("model"), ema_state
    why = ("no val split in --data (data_prep --val-fraction F makes one)" if run.manifest.val is None
           else "no epoch finished")
    chosen = dict(checkpoint="last", epoch=len(state.history), on=None, why=why)
    run.monitor.print(f"model.pt = the last epoch's weights, no best.pt: {why}")
    return (chosen, dict(state.history[-1]) if state.history else {},
            checkpointer.model.state_dict() if main else None,
            ema.module.state_dict() if main and ema is not None else None)


def main(argv: list[str] | None = None, cfg: Config | None = None) -> int:
    # Bad flags: argparse prints usage + one line, exit 2. A UsageError: one line, exit 2 (cli_main).
    code = cli_main("train.py", lambda: run_explaining_dead_peers(cfg or parse_config(argv)))
    if code == 2:                   # a usage error, found alike on every rank after set-up: leave the group cleanly
        distributed.shut_down()
    return code


def run_explaining_dead_peers(cfg: Config) -> int:
    try:
        return train(cfg)
    except Exception as e:  # noqa: BLE001 -- a dead peer is an event to explain, not a traceback to dump
        message = distributed.collective_failure(e)
        if message is None:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(cfg=CONFIG))
