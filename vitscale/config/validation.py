"""Checks of a config that need nothing but the config: ranges, combinations of keys, files that
must exist, the DeepSpeed preset; and the layout checks that also need the world size.

Everything here runs before any process group starts and raises ``ConfigError`` naming the key,
its value and the fix. Checks that need the model or the data (a registered model name, heads
that split over the tensor ranks, shards that hold the configured classes) belong to
``vitscale.experiment``, which runs these first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vitscale.config.deepspeed import compose_ds_config
from vitscale.config.schema import Config, ConfigError


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def check_config(cfg: Config) -> None:
    """Checks that need only the config. Raises ConfigError naming the key and the fix."""
    t, p, d, o, log, ck = cfg.train, cfg.parallel, cfg.data, cfg.optim, cfg.log, cfg.checkpoint
    for key, value, low in [("train.steps", t.steps, 1), ("train.micro_batch", t.micro_batch, 1),
                            ("train.global_batch", t.global_batch, 1), ("parallel.pipe", p.pipe, 1),
                            ("parallel.tensor", p.tensor, 1), ("data.image_size", d.image_size, 1),
                            ("data.num_classes", d.num_classes, 1), ("data.instances", d.instances, 1),
                            ("data.num_workers", d.num_workers, 0), ("data.prefetch", d.prefetch, 1),
                            ("log.every", log.every, 1), ("log.warmup_steps", log.warmup_steps, 0),
                            ("checkpoint.every", ck.every, 0), ("checkpoint.keep", ck.keep, 0),
                            ("train.max_bad_steps", t.max_bad_steps, 1), ("parallel.heartbeat_s", p.heartbeat_s, 0),
                            ("optim.warmup_steps", o.warmup_steps, 0)]:
        if value < low:
            _fail(f"{key}={value} must be >= {low}")
    if t.lr <= 0:
        _fail(f"train.lr={t.lr} must be > 0")
    if p.timeout_s <= 0:
        _fail(f"parallel.timeout_s={p.timeout_s} must be > 0 seconds, e.g. 300")
    if not 0 <= log.straggler_fraction < 1:
        _fail(f"log.straggler_fraction={log.straggler_fraction} must be in [0, 1), e.g. 0.8 (0 turns the warning off)")
    if t.global_batch % t.micro_batch:
        _fail(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch} "
             f"(x data-parallel ranks); e.g. train.global_batch={t.micro_batch * max(1, round(t.global_batch / t.micro_batch))}")
    if len(d.mean) != 3 or len(d.std) != 3:
        _fail(f"data.mean and data.std need 3 values (RGB), got {d.mean} and {d.std}")
    if len(o.betas) != 2:
        _fail(f"optim.betas={o.betas} needs two values, e.g. [0.9, 0.999]")
    if t.compile and p.zero == 3:
        _fail("train.compile=true cannot run with parallel.zero=3: ZeRO-3 gathers and frees each layer's parameters "
              "in hooks that run inside every block's forward, which torch.compile would trace; use parallel.zero "
              "0-2 (with parallel.offload=optimizer for memory) or train.compile=false")
    if o.name == "lamb" and (p.zero > 0 or p.tensor > 1):
        # LAMB scales each parameter's update by ||w|| / ||update||. ZeRO 1-3 hand the optimizer one flat
        # partition per group (and a tensor rank holds a slice of a parameter), so the ratio would be
        # taken over the wrong vector; Lion is elementwise and runs in every layout.
        _fail(f"optim.name=lamb needs whole parameters in the optimizer: parallel.zero=0 and parallel.tensor=1 "
              f"(now zero={p.zero}, tensor={p.tensor}); LAMB's per-parameter trust ratio is wrong over ZeRO's flat "
              "partitions and tensor shards. Use optim.name=lion (elementwise: any layout) or adamw, or drop ZeRO "
              "and tensor parallelism (bf16 needs ZeRO, so LAMB trains in fp32 or fp16)")
    _check_data(cfg)
    _check_eval(cfg)
    _check_monitors(cfg)
    _check_finetune(cfg)
    if p.offload == "all" and p.zero != 3:
        _fail(f"parallel.offload=all offloads parameters, which only ZeRO-3 does; set parallel.zero=3 "
             f"or parallel.offload=optimizer (now parallel.zero={p.zero})")
    if p.offload == "optimizer" and p.zero == 0:
        _fail("parallel.offload=optimizer needs ZeRO 1, 2 or 3; set parallel.zero=1 or parallel.offload=none")
    if p.pipe > 1 and p.zero > 1:
        # DeepSpeed asserts this inside PipelineModule; say it before any process starts.
        _fail(f"parallel.zero={p.zero} cannot run with parallel.pipe={p.pipe}: DeepSpeed's pipeline engine "
             f"supports only ZeRO 0 and 1; set parallel.zero=1 or parallel.pipe=1")
    _check_precision(cfg)
    _check_model_options(cfg)
    _check_sparsity(cfg)
    _check_distill(cfg)
    _check_adatape(cfg)
    _check_cappa(cfg)
    if p.activation_checkpoint < 0:
        _fail(f"parallel.activation_checkpoint={p.activation_checkpoint} must be >= 0 (blocks per recomputed "
             "chunk; 0 turns it off)")
    if ck.resume not in ("auto", "never") and not Path(ck.resume).exists():
        _fail(f"checkpoint.resume='{ck.resume}' is neither auto, never, nor an existing checkpoint folder")
    if cfg.model.init is not None and not (Path(cfg.model.init).is_file() or _is_checkpoint_dir(cfg.model.init)):
        _fail(f"model.init='{cfg.model.init}' is not a file or a vitscale run / checkpoint folder; give a "
             ".safetensors or .pt state dict (ours, timm's or open_clip's) or a run folder with checkpoints")
    compose_ds_config(cfg, data_parallel=1, check_batch=False)  # surfaces preset problems now


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not isinstance(d.params, dict):
        _fail(f"data.params={d.params!r} must be a mapping of generator arguments, e.g. data.params={{num_points: 20000}}")
    if d.shuffle_buffer < 0:
        _fail(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (0 or 1 turns shuffling off)")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        _fail(f"data.crop_scale={d.crop_scale} must be [low, high] with 0 < low <= high <= 1")
    if len(d.crop_ratio) != 2 or not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        _fail(f"data.crop_ratio={d.crop_ratio} must be [low, high] with 0 < low <= high")
    if not 0 <= d.hflip <= 1:
        _fail(f"data.hflip={d.hflip} must be a probability in [0, 1]")
    if d.epoch_samples is not None and d.epoch_samples < 1:
        _fail(f"data.epoch_samples={d.epoch_samples} must be positive")
    if d.canvas < 0:
        _fail(f"data.canvas={d.canvas} must be >= 0 (0 = image_size * 8 / 7)")
    pk = d.packing
    if pk.seq_len and (pk.max_images < 1 or not 0 <= pk.token_drop < 1 or pk.min_size < 0
                       or pk.min_size > d.image_size):
        _fail(f"data.packing: max_images={pk.max_images} must be >= 1, token_drop={pk.token_drop} in [0, 1), "
             f"min_size={pk.min_size} between 0 and data.image_size={d.image_size}")
    if pk.seq_len and d.render == "device":
        _fail("data.packing with data.render=device is not supported (packing cuts host images into patches in the "
              "loader); set data.render=workers or data.packing.seq_len=0")
    if pk.seq_len and cfg.parallel.pipe > 1:
        _fail(f"data.packing with parallel.pipe={cfg.parallel.pipe} is not supported (the pipeline sends one "
             "tensor between stages, packed sequences need their segment ids in every stage); set parallel.pipe=1")


def _check_finetune(cfg: Config) -> None:
    """The fine-tuning keys (issue 10): DeiT augmentation, layer decay, EMA, the test split."""
    d, o, t, p = cfg.data, cfg.optim, cfg.train, cfg.parallel
    for key in ("random_erasing", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(d, key) <= 1:
            _fail(f"data.{key}={getattr(d, key)} must be a probability in [0, 1]")
    if d.mixup < 0 or d.cutmix < 0:
        _fail(f"data.mixup={d.mixup} and data.cutmix={d.cutmix} are Beta alphas: >= 0 (0 turns each off)")
    if d.rand_augment is not None and not d.rand_augment.startswith("rand"):
        _fail(f"data.rand_augment={d.rand_augment!r} must be a timm RandAugment spec such as rand-m9-mstd0.5-inc1")
    mixing = d.mixup > 0 or d.cutmix > 0
    if mixing and t.micro_batch % 2:
        _fail(f"data.mixup / data.cutmix pair each image with another of its batch: train.micro_batch="
             f"{t.micro_batch} must be even")
    if mixing and t.loss == "sigmoid":
        _fail("data.mixup / data.cutmix give soft targets for softmax cross-entropy; set train.loss=softmax")
    if not 0 < o.layer_decay <= 1:
        _fail(f"optim.layer_decay={o.layer_decay} must be in (0, 1] (1 = off; DeiT / BEiT fine-tuning use 0.65-0.75)")
    if not 0 <= t.ema < 1:
        _fail(f"train.ema={t.ema} must be in [0, 1) (an EMA decay such as 0.9998; 0 = off)")
    if t.ema and (p.pipe > 1 or p.tensor > 1 or p.zero == 3):
        _fail(f"train.ema keeps a whole copy of the weights on each rank: it needs parallel.pipe=1, "
             f"parallel.tensor=1 and parallel.zero<3 (now {p.pipe}, {p.tensor}, {p.zero}); set train.ema=0")


def _check_monitors(cfg: Config) -> None:
    """``log.wandb``'s keys need the project to log into (``log.tensorboard`` / ``log.csv`` need nothing more)."""
    w = cfg.log.wandb
    stated = [f"log.wandb.{k}={v}" for k, v in (("mode", w.mode), ("entity", w.entity), ("group", w.group),
                                               ("name", w.name)) if v is not None]
    if w.project is None and stated:
        _fail(f"{', '.join(stated)} without log.wandb.project: W&B needs the project to log into, e.g. "
              "log.wandb.project=vitscale (or leave log.wandb out)")
    if w.project is not None and not w.project.strip():
        _fail("log.wandb.project is empty; name the W&B project, e.g. log.wandb.project=vitscale")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.every < 0 or e.batch_size < 1 or e.max_samples < 0:
        _fail("eval.every and eval.max_samples must be >= 0 and eval.batch_size >= 1")
    if e.every and cfg.parallel.pipe > 1:
        _fail("eval.every needs parallel.pipe=1 (evaluation runs the whole model on each rank's share); evaluate "
             "pipeline checkpoints with vitscale-eval CHECKPOINT --task zeroshot|retrieval")


def check_evaluation_data(cfg: Config) -> None:
    """The evaluation data the config names exists (``data.test``; ``eval.*`` when ``eval.every`` is on).
    Checked after the training data (``vitscale.experiment``), whose problems come first."""
    d, e = cfg.data, cfg.eval
    if d.test is not None and d.test != "digits" and not is_remote_path(d.test) and not exists_pattern(d.test):
        _fail(f"data.test={d.test} does not exist; give digits, an image folder or labelled shards")
    for key in ("zeroshot", "retrieval"):
        path = getattr(e, key)
        if e.every and path and not is_remote_path(path) and not exists_pattern(path):
            _fail(f"eval.{key}={path} does not exist")


def _check_precision(cfg: Config) -> None:
    """bf16 as the composer sets it up (``vitscale.config.deepspeed``): fp32 gradient accumulation,
    which DeepSpeed 0.19 has for bf16 only with ZeRO (its ``BF16_Optimizer`` from stage 1 on)."""
    t, p = cfg.train, cfg.parallel
    if t.precision == "bf16" and p.zero == 0:
        # runtime/engine.py _do_optimizer_sanity_check: bf16 weights with fp32 accumulation and no
        # ZeRO raise NotImplementedError ("unsupported mix"); without fp32 accumulation DeepSpeed
        # would sum the micro-batches' gradients and all-reduce them in bf16.
        _fail(f"train.precision=bf16 needs parallel.zero >= 1 (now parallel.zero={p.zero}): DeepSpeed accumulates "
              "bf16 gradients in fp32 only with ZeRO; set parallel.zero=1 (its BF16_Optimizer keeps fp32 gradients "
              "and fp32 master weights, sharded over the data-parallel ranks; with one data rank nothing is "
              "sharded), or train.precision=fp32")
    if t.grad_comm_dtype != "fp32" and t.precision != "bf16":
        _fail(f"train.grad_comm_dtype={t.grad_comm_dtype} applies to train.precision=bf16 only (now "
              f"train.precision={t.precision}); remove it or set train.precision=bf16")


def _check_model_options(cfg: Config) -> None:
    """The architecture options (issue 11) that contradict each other whatever the model."""
    m = cfg.model
    if m.bias is False and m.qkv_bias:
        _fail("model.bias=false drops the QKV biases but model.qkv_bias=true asks for them; set one of them")
    if m.moe.blocks < 0 or m.moe.experts < 1 or m.moe.slots < 1:
        _fail(f"model.moe.blocks={m.moe.blocks} must be >= 0, model.moe.experts={m.moe.experts} and "
             f"model.moe.slots={m.moe.slots} >= 1")


def _check_sparsity(cfg: Config) -> None:
    """``model.sparsity`` (issue 25): a pattern, a target it does not contradict, a schedule inside the run,
    and a layout whose ranks each hold whole matrices (the model's widths are checked in ``experiment.py``)."""
    sp, t = cfg.model.sparsity, cfg.train
    if sp.pattern is None:
        return
    pattern = str(sp.pattern)
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if pattern != "unstructured" and not (match and 0 < int(match[1]) < int(match[2])):
        _fail(f"model.sparsity.pattern={sp.pattern!r} must be 'n:m' with 0 < n < m (e.g. 2:4, the sparse tensor "
              "cores' pattern) or 'unstructured'")
    if match:
        implied = 1 - int(match[1]) / int(match[2])
        if sp.target is not None and abs(sp.target - implied) > 1e-9:
            _fail(f"model.sparsity.target={sp.target} contradicts pattern={pattern}, which zeros {implied:g} of the "
                  f"weights; remove model.sparsity.target (or set it to {implied:g})")
        if sp.schedule == "gradual":
            _fail(f"model.sparsity.schedule=gradual ramps unstructured sparsity; pattern={pattern} sets its mask at "
                  "once: use schedule=from_start (with dense_warmup=N to train dense for N steps first)")
    elif sp.target is None or not 0 < sp.target < 1:
        _fail(f"model.sparsity.pattern=unstructured needs model.sparsity.target, the fraction of zeros in (0, 1) "
              f"(the sparsity scaling laws study 0.5-0.9), got {sp.target}")
    if not 0 <= sp.dense_warmup < t.steps:
        _fail(f"model.sparsity.dense_warmup={sp.dense_warmup} must be in [0, train.steps={t.steps}) (0 = sparse from "
              "the initial weights)")
    if sp.every < 1 or sp.start_step < 0:
        _fail(f"model.sparsity.every={sp.every} must be >= 1 and model.sparsity.start_step={sp.start_step} >= 0")
    if sp.schedule == "gradual":
        end = sp.end_step if sp.end_step is not None else max(1, t.steps // 2)
        if not sp.start_step < end <= t.steps:
            _fail(f"model.sparsity: start_step={sp.start_step} < end_step={end} <= train.steps={t.steps} must hold "
                  "for the gradual schedule")
        if sp.dense_warmup:
            _fail("model.sparsity.dense_warmup is the from_start schedule's; the gradual one starts at start_step: "
                  f"set model.sparsity.start_step={sp.dense_warmup} instead")
    if cfg.parallel.zero == 3:
        _fail("model.sparsity cannot run with parallel.zero=3: ZeRO-3 splits each weight matrix over the data ranks, "
              "so no rank holds the whole rows (n:m groups, magnitude thresholds) its mask is computed from; use "
              "parallel.zero=1 or 2 (optimizer states and gradients still sharded) or parallel.tensor to split "
              "the weights")


def _check_distill(cfg: Config) -> None:
    """``train.distill`` (train/distill.py); the teacher's architecture is checked against the student later."""
    d, p = cfg.train.distill, cfg.parallel
    if d.teacher is None:
        if d.model is not None:
            _fail("train.distill.model describes the teacher's architecture, but train.distill.teacher is not set")
        return
    if not (Path(d.teacher).is_file() or _is_checkpoint_dir(d.teacher)):
        _fail(f"train.distill.teacher='{d.teacher}' is not a file or a vitscale run / checkpoint folder; give a run "
              "folder of the teacher's training, or a .safetensors / .pt state dict with timm's names")
    if d.model is not None and Path(d.teacher).is_dir():
        _fail("train.distill.model describes a weights file's architecture; a run folder teacher brings its own "
              "(its config.yaml): remove train.distill.model")
    if d.temperature <= 0:
        _fail(f"train.distill.temperature={d.temperature} must be > 0 (1 = the teacher's own probabilities)")
    if not 0 <= d.alpha <= 1:
        _fail(f"train.distill.alpha={d.alpha} must be in [0, 1]: the label loss's weight, (1 - alpha) the teacher's")
    if p.pipe > 1:
        _fail(f"train.distill with parallel.pipe={p.pipe} is not supported: the loss lives on the last stage, which "
              "would need the whole teacher and the images; set parallel.pipe=1 (tensor and ZeRO 0-3 work)")
    if cfg.data.packing.seq_len:
        _fail("train.distill with data.packing is not supported (the teacher takes whole images); set "
              "data.packing.seq_len=0")


def _check_adatape(cfg: Config) -> None:
    """``model.adatape`` (models/adatape.py)."""
    a, p, m = cfg.model.adatape, cfg.parallel, cfg.model
    if a.bank is None:
        return
    if a.bank_size < 1 or not 1 <= a.max_tokens <= a.bank_size:
        _fail(f"model.adatape: bank_size={a.bank_size} must be >= 1 and max_tokens={a.max_tokens} in [1, bank_size]")
    if not 0 < a.threshold <= 1:
        _fail(f"model.adatape.threshold={a.threshold} must be in (0, 1]: the share of the bank's softmax score a "
              "sample reads (1 = always max_tokens)")
    if a.bank == "input":
        side = round(a.bank_size ** 0.5)
        if side * side != a.bank_size or cfg.data.image_size % side:
            _fail(f"model.adatape.bank=input cuts the image into bank_size={a.bank_size} patches: it must be a square "
                  f"number whose side divides data.image_size={cfg.data.image_size}, e.g. "
                  f"{(cfg.data.image_size // 8) ** 2} (8 px patches)")
    if p.pipe > 1:
        _fail(f"model.adatape with parallel.pipe={p.pipe} is not supported: the stages pass one tensor, the tape "
              "needs its mask in every stage; set parallel.pipe=1 (tensor and data parallelism work)")
    if cfg.data.packing.seq_len:
        _fail("model.adatape with data.packing is not supported; set data.packing.seq_len=0")
    if m.moe.blocks:
        _fail("model.adatape with model.moe is not supported: Soft MoE slots would mix in the unused tape slots; "
              "set model.moe.blocks=0")
def _check_cappa(cfg: Config) -> None:
    """Captioning pre-training (``train.objective=cappa``): its decoder and batch split, and the layouts it runs in."""
    t, dec, p = cfg.train, cfg.model.decoder, cfg.parallel
    if t.objective != "cappa":
        return
    if not 0 <= t.cappa.parallel_fraction <= 1:
        _fail(f"train.cappa.parallel_fraction={t.cappa.parallel_fraction} must be in [0, 1] (the share of samples "
              "trained by parallel prediction; the paper uses 0.75)")
    for key in ("layers", "width", "heads"):
        if getattr(dec, key) < 1:
            _fail(f"model.decoder.{key}={getattr(dec, key)} must be >= 1")
    if dec.width % dec.heads:
        ok = [h for h in range(1, min(dec.width, 64) + 1) if dec.width % h == 0]
        _fail(f"model.decoder.width={dec.width} must be divisible by model.decoder.heads={dec.heads}; use "
              f"model.decoder.heads in {ok}")
    if dec.mlp_ratio <= 0:
        _fail(f"model.decoder.mlp_ratio={dec.mlp_ratio} must be > 0")
    if p.pipe > 1:
        _fail(f"CapPa under parallel.pipe>1 is not supported yet (parallel.pipe={p.pipe}): the pipeline layers "
              "(models/pipeline.py) pass one image and one text stream between stages, and the decoder's every "
              "block needs the image tower's output tokens besides its own; use parallel.pipe=1 with "
              "parallel.tensor and ZeRO instead")
    if cfg.eval.every:
        _fail(f"eval.every={cfg.eval.every}: a CapPa run has no text tower for zero-shot / retrieval; set eval.every=0 "
              "and evaluate the image tower after training (vitscale-export RUN --to timm, then vitscale-eval "
              "--task linear-probe or a fine-tuning run with model.init)")


def _is_checkpoint_dir(path: str) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() or (p.parent.name == "checkpoints" and p.is_dir())


def is_remote_path(path: str) -> bool:
    """A ``pipe:`` command or a URL: nothing to check on this machine."""
    return path.startswith("pipe:") or "://" in path


def exists_pattern(path: str) -> bool:
    """Whether ``path`` exists, or the first path its braces expand to."""
    if Path(path).exists():
        return True
    import braceexpand

    first = next(iter(braceexpand.braceexpand(path)), None)
    return first is not None and Path(first).exists()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """How the world splits: pipe x tensor x data ranks, and micro-batches accumulated per step."""

    world_size: int
    pipe: int
    tensor: int
    data: int
    grad_accum: int


def validate_layout(cfg: Config, world_size: int) -> Layout:
    """Checks that need the world size: divisibility of ranks and of batch sizes."""
    p, t = cfg.parallel, cfg.train
    model_ranks = p.pipe * p.tensor
    if world_size % model_ranks:
        _fail(f"world size {world_size} is not divisible by parallel.pipe x parallel.tensor = "
             f"{p.pipe} x {p.tensor} = {model_ranks}; launch a multiple of {model_ranks} processes "
             f"or change the layout")
    data = world_size // model_ranks
    per_step = t.micro_batch * data
    if t.global_batch % per_step:
        good = per_step * max(1, round(t.global_batch / per_step))
        _fail(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch x data-parallel "
             f"ranks = {t.micro_batch} x {data} = {per_step}; e.g. train.global_batch={good}, or a "
             f"train.micro_batch that divides {t.global_batch // data if t.global_batch % data == 0 else t.global_batch}")
    return Layout(world_size, p.pipe, p.tensor, data, t.global_batch // per_step)
