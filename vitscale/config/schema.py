"""The experiment schema: one typed dataclass per config section, every field commented with its
unit and meaning. ``configs/*.yaml`` and ``key.sub=value`` overrides are read into these
(``loading.py``); nothing here knows models, data or DeepSpeed."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class MoEConfig:
    """Soft MoE (Puigcerver et al. 2024) in place of the MLP of the last ``blocks`` blocks."""

    blocks: int = 0  # 0 = no MoE
    experts: int = 8  # experts per MoE layer (each an MLP of the block's width); replicated on every rank
    slots: int = 1  # slots per expert: each expert processes experts x slots weighted token averages per image


@dataclass
class SparsityConfig:
    """Weight sparsity of the blocks' linear layers (qkv, proj, fc1, fc2; both CLIP towers) by magnitude
    (vitscale.models.sparsity, vitscale.train.sparsity): the weights stay exactly sparse after every step."""

    # "n:m" (e.g. "2:4": n non-zeros in every m consecutive weights along the input dimension, the
    # structure sparse tensor cores run) | "unstructured" (per-matrix magnitude threshold); None = dense
    pattern: str | None = None
    target: float | None = None  # final fraction of zeros in each matrix (unstructured); n:m implies 1 - n/m
    # from_start: the full target at once, after dense_warmup steps; gradual (unstructured): Zhu & Gupta's
    # cubic ramp from 0 at start_step to target at end_step
    schedule: Literal["from_start", "gradual"] = "from_start"
    start_step: int = 0  # gradual: the step the ramp starts
    end_step: int | None = None  # gradual: the step it reaches target; None = train.steps // 2
    every: int = 1  # gradual: steps between mask updates (Zhu & Gupta's delta t; they use 100-1000)
    dense_warmup: int = 0  # from_start: steps trained dense before the mask is set (0 = from the initial weights)


@dataclass
class PackingConfig:
    """NaViT sequence packing (vitscale.data.packing): images at native aspect ratio and sampled
    resolution (longest side in [min_size, data.image_size]) packed into sequences."""

    seq_len: int = 0  # tokens per packed sequence; 0 = no packing (a micro-batch is micro_batch sequences)
    max_images: int = 8  # image slots per sequence
    min_size: int = 0  # smallest longest side of the resolution sampling, pixels; 0 = data.image_size (no sampling)
    token_drop: float = 0.0  # fraction of each image's patches dropped at random


@dataclass
class AdaTapeConfig:
    """AdaTape (Xue et al. 2023): per sample, the Adaptive Tape Reader picks tape tokens from a bank and
    appends them to the sequence (vitscale/models/adatape.py); harder samples may read more of them."""

    bank: Literal["learnable", "input"] | None = None  # learnable: a bank_size x width parameter; input: the
    # image's own patches at a finer patch size (bank_size of them); None = no AdaTape
    bank_size: int = 64  # tokens in the bank; input: a square number whose side divides data.image_size
    max_tokens: int = 8  # tape slots per sample: the most tape tokens a sample reads (FLOPs count all of them)
    threshold: float = 0.5  # a sample reads tokens by descending score until their softmax scores sum to this


@dataclass
class DecoderConfig:
    """CapPa's text decoder (``train.objective=cappa``, Tschannen et al. 2023): pre-norm blocks of causal
    self-attention, cross-attention to the image tower's tokens and an MLP. Its vocabulary and caption
    length are the CLIP's text tower's (``model.text``: vocab_size, context_length), the tokenizer's."""

    layers: int = 2  # decoder blocks (sized for clip_tiny; the paper's B/16 decoder has 6 of width 768)
    width: int = 64  # token width of the decoder
    heads: int = 4  # attention heads of both the self- and the cross-attention; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width = int(width * mlp_ratio)


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16"  # a registered name: vitscale.models.list_models()
    # Weights to start from: a .safetensors / .pt state dict with our (= timm) names, an open_clip
    # checkpoint, or a vitscale run / checkpoint folder (any layout). A head of another class count
    # is replaced (freshly initialised), a position embedding of another grid resampled (timm's
    # resample_abs_pos_embed), so a pre-trained model fine-tunes at a new resolution on new classes.
    init: str | None = None
    # Architecture overrides; None keeps the size's default. Image size and class
    # count come from the data section (stated once).
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qkv_bias: bool | None = None
    qk_norm: bool | None = None  # LayerNorm on queries and keys per head (ViT-22B)
    bias: bool | None = None  # false: no bias in QKV and LayerNorms (ViT-22B); None keeps the model's
    parallel_block: bool | None = None  # attention and MLP in parallel, fused projections (ViT-22B)
    dual_patchnorm: bool | None = None  # LayerNorm before and after the patch embedding
    pos_embed: Literal["learned", "factorized"] | None = None  # factorized: row + column tables (NaViT, packing)
    moe: MoEConfig = field(default_factory=MoEConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # n:m / unstructured weight sparsity
    adatape: AdaTapeConfig = field(default_factory=AdaTapeConfig)  # adaptive tape tokens (a ViT classifier)
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    class_token: bool | None = None
    global_pool: Literal["token", "avg"] | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over blocks
    # CLIP (model.name clip_*): tower overrides with open_clip's field names, e.g.
    # vision: {layers: 2, width: 64}, text: {context_length: 16, vocab_size: 1000};
    # embed_dim is the joint embedding, patch_size the image tower's.
    vision: dict | None = None
    text: dict | None = None
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # CapPa's text decoder (train.objective=cappa)


@dataclass
class DataConfig:
    source: str = "gratings"  # a generator (vitscale-synth list), rendered on the fly, a shard folder / pattern,
    # or fine-tuning data: digits (built in) or an image folder (one sub-folder per class)
    shards: Any = None  # shard folder, brace/glob pattern, or a list of them (vitscale-synth output); set -> read shards
    params: dict = field(default_factory=dict)  # on the fly: generator keyword arguments (as vitscale-synth --param)
    image_size: int = 64  # pixels, square
    num_classes: int = 10
    instances: int = 1000  # instances per class: one epoch = num_classes * instances samples
    num_workers: int = 2  # DataLoader worker processes per rank
    render: Literal["workers", "device"] = "workers"  # on the fly: images rendered in the loader workers, or on the
    # training device right before the forward (generators with render_batch; workers then pass only labels and instances)
    prefetch: int = 4  # batches prefetched per worker
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # normalisation, applied on the device
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    shuffle_buffer: int = 1000  # shards: samples each loader worker shuffles together (LAION: blocks of this many raw samples; 0/1 = off)
    augment: bool = True  # shards: random resized crop + horizontal flip (FDSL pre-training); on the fly never augments
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # random resized crop: area fraction range
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333])  # aspect ratio range (log-uniform)
    hflip: float = 0.5  # probability of a horizontal flip
    packing: PackingConfig = field(default_factory=PackingConfig)  # NaViT packing of a classifier's images
    # data.source=laion (img2dataset image-text shards, vitscale.data.laion):
    resampled: bool = True  # draw shards with replacement, epochs of epoch_samples (open_clip); false = exact epochs
    epoch_samples: int | None = None  # resampled: samples per epoch over all data ranks (default: the shards' sizes)
    filters: dict = field(default_factory=dict)  # metadata filters before decoding (vitscale.data.laion.FILTER_KEYS)
    canvas: int = 0  # side of the uint8 canvas images travel on (crop + resize on the device); 0 = image_size * 8/7
    # Fine-tuning (data.source=digits, an image folder, or labelled shards with rand_augment set;
    # vitscale.data.downstream): timm's transforms and DeiT's batch augmentation.
    test: str | None = None  # test split (digits | folder | shards): top-1/top-5 during (eval.every) and after training
    rand_augment: str | None = None  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (DeiT); None = off
    random_erasing: float = 0.0  # probability of timm's RandomErasing per image (DeiT: 0.25)
    mixup: float = 0.0  # Mixup alpha (DeiT: 0.8); 0 = off
    cutmix: float = 0.0  # CutMix alpha (DeiT: 1.0); 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # with both on: probability of CutMix instead of Mixup


@dataclass
class ParallelConfig:
    pipe: int = 1  # pipeline stages
    tensor: int = 1  # tensor-parallel degree; data = world_size / (pipe * tensor)
    zero: Literal[0, 1, 2, 3] = 0  # ZeRO stage
    offload: Literal["none", "optimizer", "all"] | None = None  # None: as the preset says; all = optimizer + params (ZeRO-3)
    ds_preset: str = "auto"  # a file in ds_configs/ (name or path); auto = zero{stage}.json
    partition: Literal["blocks", "parameters", "uniform"] = "blocks"  # how layers split over pipeline stages
    activation_checkpoint: int = 0  # recompute activations in chunks of this many blocks; 0 = off
    # Network interface for rendezvous and collectives (ib0, or a prefix such as ib); None =
    # VITSCALE_IFNAME / NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, else the launcher's choice.
    interface: str | None = None
    # Fail fast (issues 9, 19): a collective that waits longer than timeout_s fails, on every
    # process group (ours and DeepSpeed's; backend defaults: gloo 30, NCCL 10 minutes), and the
    # watchdog (watchdog.py) names the rank whose step stopped; a rank silent for heartbeat_s
    # (dead process or node) ends the job too, naming the rank. 0 turns the watchdog off.
    timeout_s: float = 300.0
    heartbeat_s: float = 60.0


@dataclass
class OptimConfig:
    # adamw; lion (Chen et al. 2023: sign of an interpolated momentum, one state: use a 3-10x smaller
    # train.lr and a 3-10x larger weight_decay than AdamW's); lamb (You et al. 2019: Adam with a
    # per-parameter trust ratio, for large batches; needs whole parameters: parallel.zero=0, tensor 1).
    # DeepSpeed's kernels where it has one (FusedLion / CPU Lion, FusedLamb in fp16), timm's otherwise.
    name: Literal["adamw", "lamb", "lion"] = "adamw"
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings, class token
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 10  # linear warm-up from warmup_init_ratio * lr
    warmup_init_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio * lr
    torch_adam: bool = False  # torch.optim.AdamW instead of DeepSpeed's fused / CPU Adam kernel
    layer_decay: float = 1.0  # layer-wise LR decay (BEiT / DeiT fine-tuning, timm's param_groups_layer_decay); 1 = off


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015; ViT-22B's students): a frozen teacher runs forward on every
    batch and the student also learns its predictions (vitscale/train/distill.py). A ViT classifier student."""

    # The teacher: a vitscale run / checkpoint folder of any layout (its config.yaml gives the architecture),
    # or a .safetensors / .pt state dict with our (= timm's) names; None = no distillation.
    teacher: str | None = None
    # A weights-file teacher's architecture: model-section keys replacing the student's, e.g.
    # {name: vit_small_patch16, depth: 12}; None = the student's own. A run folder brings its own.
    model: dict | None = None
    kind: Literal["soft", "hard"] = "soft"  # soft: KL to the teacher's softened probabilities x T^2; hard: CE to its argmax
    temperature: float = 1.0  # soft: T, dividing both models' logits
    alpha: float = 0.5  # loss = alpha * label loss + (1 - alpha) * distillation loss; 1 = the label loss alone


@dataclass
class CapPaConfig:
    """Captioning pre-training (CapPa, Tschannen et al. 2023), ``train.objective=cappa``."""

    # Share of the samples trained by parallel prediction (every decoder input a [MASK] token, no causal
    # mask, all tokens predicted at once); the rest by autoregressive captioning. Chosen per sample from
    # its noise key, so every layout splits a batch alike. The paper: 0.75.
    parallel_fraction: float = 0.75


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    seed: int = 0  # weights, data order and augmentation all derive from it
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # bf16 only: the dtype gradients are reduced in over the data-parallel ranks. They always
    # accumulate over micro-batches in fp32; fp32 keeps them fp32 on the wire too (Megatron's and
    # torchtitan's default), bf16 halves the gradient traffic and rounds each reduction to bf16.
    grad_comm_dtype: Literal["fp32", "bf16"] = "fp32"
    micro_batch: int = 16  # samples per data-parallel rank per forward/backward
    global_batch: int = 32  # samples per optimizer step over all data-parallel ranks
    lr: float = 1e-3  # peak learning rate
    label_smoothing: float = 0.0
    # None = the model's own: softmax for a classifier, clip for a CLIP. A classifier: softmax cross-entropy,
    # or sigmoid (multi-label, ViT-22B). A CLIP: clip (softmax contrastive, as open_clip; softmax reads as clip),
    # or siglip (pairwise sigmoid, Zhai et al. 2023: the model gets a learned logit bias, init -10, and logit
    # scale log 10, as open_clip_train --siglip).
    loss: Literal["softmax", "sigmoid", "clip", "siglip"] | None = None
    # bf16 / fp32: a step whose loss or gradient norm is NaN / Inf on any rank is skipped on every
    # rank (the weights stay as they were); this many such steps in a row stop the run (fp16's
    # loss scaler skips such steps itself and lowers the scale). No checkpoint of them is written.
    max_bad_steps: int = 3
    distill: DistillConfig = field(default_factory=DistillConfig)  # a frozen teacher's predictions as targets too
    # None = what the model's kind trains with (a classifier's labels, a CLIP's contrastive loss); cappa:
    # captioning pre-training of a CLIP config's image tower with a text decoder (model.decoder, train.cappa)
    # in place of the text tower, on the same image-text data.
    objective: Literal["cappa"] | None = None
    cappa: CapPaConfig = field(default_factory=CapPaConfig)
    ema: float = 0.0  # decay of an EMA of the weights (timm's ModelEmaV3, e.g. 0.9998), evaluated on data.test; 0 = off
    # torch.compile each transformer block (regional compilation, as torchtitan does: one graph reused by
    # every block), in every layout but ZeRO-3 (whose parameter hooks run inside each block's forward)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: the graphs without code generation)
    # Images handed to the model in channels-last memory (NHWC): the patch embedding's convolution then
    # runs cuDNN's NHWC kernels and its output is already in the (B, N, D) token order; auto = on CUDA.
    channels_last: Literal["auto", True, False] = "auto"


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install 'vitscale[wandb]'``): on when ``project`` is set."""

    project: str | None = None  # the W&B project; None = no W&B
    mode: Literal["offline", "online"] | None = None  # None = wandb's own choice (WANDB_MODE, else online)
    entity: str | None = None  # team or user (DeepSpeed's wandb.team); None = your default entity
    group: str | None = None  # groups runs, e.g. a sweep's
    name: str | None = None  # the run's name; None = the run folder's name


@dataclass
class LogConfig:
    every: int = 10  # steps between train / throughput records
    progress: bool = True  # live progress bar on global rank 0
    warmup_steps: int = 2  # first steps left out of throughput figures (compilation, allocator warm-up)
    peak_tflops: float | None = None  # per-device peak for MFU; None = from the known-device table
    straggler_fraction: float = 0.8  # warn about a node whose pace is below this fraction of the median node's; 0 = never
    level: Literal["debug", "info", "warning"] = "info"
    preview: bool = True  # rank 0 writes run.dir/preview.png: the first micro-batch as the model sees it
    # Monitors (train/monitors.py): every number of every metrics.jsonl record as a scalar, written
    # by the same writer; a resumed run replaces the steps after its checkpoint.
    tensorboard: bool = False  # TensorBoard event files in run.dir/tensorboard/
    csv: bool = False  # one CSV per scalar (step,value) in run.dir/csv/ (DeepSpeed's csv_monitor)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    dir: str = "runs/vit_tiny"  # run folder: config.yaml, ds_config.json, metrics.jsonl, checkpoints/


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    at_end: bool = True
    resume: str = "auto"  # auto (latest in run.dir/checkpoints, if any) | never | PATH to a checkpoint folder
    keep: int = 2  # most recent checkpoints kept; 0 keeps all
    # A checkpoint of another layout (parallel.pipe / tensor / data): error, or weights
    # (resharded weights and LR schedule; optimizer moments start afresh).
    reshard: Literal["error", "weights"] = "error"


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (and at the end); 0 = off (CLIP, parallel.pipe=1)
    zeroshot: str | None = None  # labelled webdataset / image folder for zero-shot top-1/top-5
    retrieval: str | None = None  # held-out image-text shards for recall@1/5/10
    classnames: str | None = None  # file (one per line) | imagenet; default: classnames.txt beside the data, else imagenet
    templates: str | None = None  # file ('{}' per line) | openai | simple; default: templates.txt beside the data, else openai
    batch_size: int = 64  # images per forward pass per rank
    max_samples: int = 0  # evaluate at most this many samples (0 = all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config that cannot work; the message names the key and the fix."""


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``train.lr``."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = dataclass_type(cls, f.name)
        keys += all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dataclass_type(cls: type, name: str) -> type | None:
    hint = hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None
