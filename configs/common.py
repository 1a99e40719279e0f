"""Building blocks shared by every experiment config.

Each `configs/<experiment>.py` calls `base_config()` and sets the sections that differ. Every number of
the paper and of the SSD recipe lives here or in an experiment file, never in the library code.
"""

import ml_collections

# The SSD300 / SSD512 extra layers (docs/model.md, "Extra layers"), one tuple per block:
# (name, mid_channels, out_channels, kernel_px, stride, padding). Each block is a 1x1 conv to
# mid_channels then a kernel_px conv to out_channels; its output is called `<name>_2`.
SSD300_EXTRAS = (
    ("conv8", 256, 512, 3, 2, 1),
    ("conv9", 128, 256, 3, 2, 1),
    ("conv10", 128, 256, 3, 1, 0),
    ("conv11", 128, 256, 3, 1, 0),
)
SSD512_EXTRAS = (
    ("conv8", 256, 512, 3, 2, 1),
    ("conv9", 128, 256, 3, 2, 1),
    ("conv10", 128, 256, 3, 2, 1),
    ("conv11", 128, 256, 3, 2, 1),
    ("conv12", 128, 256, 4, 1, 1),
)

# The three Fusion Modules of MDSSD: (name, shallow map, deep map, output channels). The output
# channels equal the shallow map's, as in the paper's table ("the channels of the three modules are
# 256, 512, 1024"); the deconvs inside every block have config.model.fusion_deconv_channels (256).
MDSSD_FUSIONS = (
    ("fusion1", "conv3_3", "conv8_2", 256),
    ("fusion2", "conv4_3", "conv9_2", 512),
    ("fusion3", "conv7", "conv10_2", 1024),
)

# Pixel conventions of ImageNet VGG16 sources (docs/model.md, "ImageNet weights"). `input_range` is what a
# white pixel maps to before mean/std: 1.0 for torchvision/timm, 255 for Caffe-style weights.
IMAGENET_RGB = dict(channel_order="RGB", input_range=1.0,
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def base_config():
  """The SSD recipe's defaults; experiment configs override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- model -------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.architecture = "ssd"          # "ssd" | "mdssd"
  c.model.input_size_px = 300
  c.model.num_classes = 20              # object classes, without background
  c.model.width_multiplier = 1.0        # scales every hidden conv width; 1.0 = the paper
  c.model.batch_norm = False            # batch norm after every trunk, extra and fusion conv (from scratch)
  c.model.l2norm_init_scale = 20.0      # conv4_3's L2Norm initial scale (SSD)
  c.model.extras = SSD300_EXTRAS
  c.model.fusions = ()                  # () for plain SSD; MDSSD_FUSIONS for MDSSD
  # Width of each Fusion Block's deconvs and branch convs: one entry for every block, or one per
  # entry of `fusions`. 256 everywhere is our reading of the paper (docs/model.md, "Widths").
  c.model.fusion_deconv_channels = (256,)
  c.model.fusion_l2norm_init_scale = 20.0  # initial L2Norm scale of both branches of a Fusion Block
  # Batch norm inside the Fusion Blocks: None = as model.batch_norm; True / False overrides it (e.g. a
  # batch-norm trunk with the paper's Fusion Block, as benchmarks/study_small_objects.py compares).
  c.model.fusion_batch_norm = None
  c.model.fusion_deconv_init = "xavier"  # "xavier" | "bilinear" (interpolating upsampler, FCN/DSSD)
  # False: Fusion Blocks without their deconvolution branch, the shallow path alone (a control that
  # isolates what the deep map's semantics add: the study's mdssd_bn_shallow). True = the paper.
  c.model.fusion_deep_branch = True
  # "auto": native convs / transposed convs / reduce_window on GPU and TPU, the XLA:CPU-fastest
  # forms on CPU (the wide 3x3 convs train as Winograd F(2x2, 3x3), other convs get matmul weight
  # gradients), decided when the program is lowered; "native" / "cpu" force one (docs/model.md,
  # "Kernels per platform").
  c.model.kernels = "auto"
  # "blocks": recompute each VGG stage and Fusion Block in the backward pass (less activation memory,
  # ~1/3 more forward FLOPs) with the jax.checkpoint policy named by remat_policy; "none": keep all.
  c.model.remat = "none"
  c.model.remat_policy = "nothing_saveable"
  # The maps that get a prediction head, finest first; their order is the default-box order.
  c.model.head_sources = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
  c.model.dtype = "float32"             # compute dtype: "bfloat16" on GPU/TPU; params stay float32
  # ImageNet VGG16 weights (safetensors / .pth), torchvision's ssd300_vgg16 COCO file, or a workdir /
  # checkpoint folder of this project to fine-tune from (docs/your_data.md); "" = none
  c.model.init_from = ""
  c.model.init_source = "auto"          # "auto" | "timm" | "torchvision" | "ssd_pytorch" | "torchvision_ssd300"
  # The paper starts the trunk from ImageNet weights: without init_from training refuses to start
  # unless this says that a random trunk is meant (the demo and tests train from scratch).
  c.model.allow_random_trunk = False
  # Pixel convention when no weights file says otherwise (a weights file brings its own).
  c.model.pixel = ml_collections.ConfigDict(IMAGENET_RGB)

  # ---- default boxes (SSD300, VOC) -------------------------------------------------------------
  c.anchors = ml_collections.ConfigDict()
  c.anchors.feature_sizes = (38, 19, 10, 5, 3, 1)
  c.anchors.steps = (8, 16, 32, 64, 100, 300)
  c.anchors.min_sizes = (30, 60, 111, 162, 213, 264)
  c.anchors.max_sizes = (60, 111, 162, 213, 264, 315)
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
  c.anchors.clip = False                # the final Caffe SSD does not clip
  c.anchors.variances = (0.1, 0.2)

  # ---- matching and loss ------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.iou_threshold = 0.5
  # "bipartite": Caffe SSD's MatchBBox (bipartite stage, then per-prediction IoU >= iou_threshold);
  # "forced": ssd.pytorch's rule (each gt's best default box forced; shared ones go to the later gt).
  c.loss.matching = "bipartite"
  c.loss.neg_pos_ratio = 3.0
  c.loss.loc_weight = 1.0

  # ---- data ---------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "voc/2007+2012"         # registry name, see mdssd_jax/data/registry.py
  c.data.data_dir = ""                  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
  c.data.manual_dir = ""                # where `--mode=prepare` finds the official files
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_boxes = 64                 # ground-truth slots per image (label 0 = padding)
  c.data.keep_difficult = True          # Caffe SSD trains on difficult boxes
  # --mode=prepare on an annotation it cannot read (bad XML, zero image size, unknown class):
  # "error" stops, naming the file and line; "skip" leaves the image out and lists it in
  # prepare_report.json beside the prepared data.
  c.data.bad_annotations = "error"
  c.data.num_workers = 2                # Grain worker processes per host (0 = in-process)
  c.data.prefetch_batches = 2           # batches each worker keeps ready
  c.data.synthetic = ml_collections.ConfigDict()   # used by the synthetic data set only
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_test = 200
  c.data.synthetic.image_size_px = 300
  c.data.synthetic.seed = 1234
  c.data.synthetic.num_classes = 6      # one class per shape (circle, square, triangle, plus, ring, diamond)
  c.data.synthetic.min_object_px = 8    # object sizes, log-uniform between these (pixels of the image)
  c.data.synthetic.max_object_px = 48
  c.data.synthetic.max_objects = 12     # labelled objects per image: 0..max (fewer where overlap is too much)
  c.data.synthetic.max_distractors = 4  # unlabelled shapes (stars, thin bars) per image: 0..max
  c.data.synthetic.colour_by_class = False  # True: one hue per class (easier: the CPU demo)
  # True: the context setting (configs/demo_context.py): tiny objects' classes told by a scene marker
  # far from them, 9 classes (num_classes is not read); the other keys keep their meaning.
  c.data.synthetic.context = False
  c.data.tt100k = ml_collections.ConfigDict()      # used by the TT100K data set only
  c.data.tt100k.classes = ()            # () = the customary 45 classes
  c.data.tt100k.train_crop_size_px = 512
  c.data.tt100k.crop_on_object_prob = 0.9  # share of training crops that contain a chosen sign (else anywhere)
  # Your own files (config.data.name = "custom"; docs/your_data.md): a COCO JSON file, an
  # ultralytics data.yaml or a VOC folder; the format is detected from the path.
  c.data.custom = ml_collections.ConfigDict()
  c.data.custom.train = ""              # annotations to train on (required)
  c.data.custom.eval = ""               # "" = data.yaml's val (YOLO), else a held-out share of train
  c.data.custom.format = ""             # "" = from the path; or "coco" | "yolo" | "voc"
  c.data.custom.train_images = ""       # COCO: the image folder ("" = the JSON's folder)
  c.data.custom.eval_images = ""
  c.data.custom.train_split = ""        # VOC: ImageSets/Main/<split>.txt ("" = every XML)
  c.data.custom.eval_split = ""         # VOC: a second list in the same folder, as the eval split
  c.data.custom.class_names = ()        # () = from the data (VOC: the XMLs' names, sorted)
  c.data.custom.holdout_fraction = 0.1  # held out of train for evaluation when there is no eval
  c.data.custom.holdout_seed = 0

  # Caffe SSD's augmentation (docs/augmentation.md), in the order it is applied.
  c.augment = ml_collections.ConfigDict()
  c.augment.photometric_prob = 0.5      # each distortion fires with this probability
  c.augment.brightness_delta = 32.0
  c.augment.contrast_range = (0.5, 1.5)
  c.augment.saturation_range = (0.5, 1.5)
  # Caffe's hue_delta 18 is in OpenCV's 8-bit hue unit (2 degrees): +-36 degrees.
  c.augment.hue_delta_deg = 36.0
  # "caffe": hues pushed below 0 stop at 0, past 360 wrap (Caffe's uint8 add + OpenCV's HSV->RGB);
  # "wrap": a true rotation of the colour wheel.
  c.augment.hue_overflow = "caffe"
  c.augment.channel_swap_prob = 0.0
  c.augment.expand_prob = 0.5
  c.augment.expand_max_ratio = 4.0
  # "caffe": Caffe's batch_sampler: every sampler below tries up to crop_max_trials crops and keeps
  # its first success, then one of the collected samples (the whole image is one) is picked.
  # "single_mode": one sampler drawn; the whole image when its trials fail (keeps the whole image
  # far more often, so small objects are rarely zoomed in).
  c.augment.crop_sampler = "caffe"
  # Samplers: None = the whole image, -1.0 = any crop (Caffe's max IoU 1.0), else the minimum IoU
  # with some box.
  c.augment.crop_min_ious = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -1.0)
  c.augment.crop_scale_range = (0.3, 1.0)
  c.augment.crop_aspect_range = (0.5, 2.0)
  c.augment.crop_max_trials = 50
  c.augment.flip_prob = 0.5
  # Class names (the data set's): pairs that are each other's mirror image (labels swapped on a
  # flip), and classes whose mirror image is no real sign of that class (an example holding one is
  # never flipped). Empty for VOC/COCO; see configs/mdssd512_tt100k.py.
  c.augment.flip_swap_labels = ()
  c.augment.flip_never_labels = ()
  # Interpolations of the final warp, one drawn per example (names: linear, area, nearest, cubic,
  # lanczos4). Caffe SSD's VOC recipe draws from all five; "linear" alone is the common choice.
  c.augment.resize_interpolations = ("linear",)

  # ---- training -----------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 32
  c.train.num_steps = 120_000
  c.train.optimizer = "sgd"             # "sgd" | "adamw"
  c.train.base_lr = 1e-3                # at reference_batch_size; scaled linearly with the batch
  c.train.reference_batch_size = 32
  # How a global batch B other than reference_batch_size changes the recipe (docs/training_recipe.md):
  # "lr_and_schedule": lr x B/ref and num_steps, lr_decay_steps, warmup_steps x ref/B (same epochs);
  # "lr_only": lr x B/ref, schedule as written (B/ref times more epochs); "none": nothing scaled.
  c.train.batch_scaling = "lr_and_schedule"
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.warmup_steps = 500
  c.train.warmup_factor = 1.0 / 3.0
  c.train.lr_decay_steps = (80_000, 100_000)
  c.train.lr_decay_factor = 0.1
  # Per-parameter learning rate and weight decay (Caffe's lr_mult / decay_mult). Neutral here; the
  # paper configs take Caffe SSD's values through caffe_sgd_recipe() below.
  c.train.bias_lr_multiplier = 1.0      # conv / deconv / head biases (Caffe SSD: 2)
  c.train.bias_weight_decay = False     # Caffe SSD: decay_mult 0 on biases
  c.train.l2norm_scale_weight_decay = False  # Caffe SSD's Normalize layer: decayed (decay_mult 1)
  # "optax": velocity of gradients, times the current lr (optax.sgd); "caffe": velocity of
  # lr x gradients (Caffe's SGDSolver), so an lr step takes effect gradually through momentum.
  c.train.momentum_form = "optax"
  c.train.grad_clip_norm = 0.0          # 0 = off
  # A step whose update multiplies the parameters' global norm by more than this is a blow-up: it is
  # not applied and the run stops, naming the last checkpoint before it (0 = off). A sane step
  # changes the norm far less (measured: 1 + 4e-6 per step, tiny_mdssd at adamw lr 1e-3; lr 1e12
  # multiplies it by 1e12 in one step while every number stays finite).
  c.train.max_param_norm_growth = 2.0
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 5_000
  c.train.keep_checkpoints = 3
  # Multi-process runs: a process that gives no sign of life for this long (dead, SIGSTOPped, stalled
  # by a slow disk or swapping) makes the others exit with one error naming it, instead of waiting
  # forever at the next collective (core/multihost.PeerWatchdog). 0 = never give up.
  c.train.collective_timeout_s = 300.0
  c.train.profile_steps = 0             # >0: write a profiler trace of that many steps

  # ---- detection: what evaluation, --mode=predict and the export share --------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32                # images (or tiles) per predict call, per process
  c.eval.score_threshold = 0.01
  c.eval.nms_iou = 0.45
  c.eval.pre_nms_top_k = 200            # per class, before NMS
  c.eval.top_k = 200                    # per image, after NMS
  c.eval.best_metric = "voc/mAP"        # "<evaluator>/<metric>" that picks the best checkpoint
  c.eval.picture_score_threshold = 0.3  # boxes drawn on pictures (evaluation uses score_threshold)
  # Pictures, contact sheet and plots of each evaluation (mdssd_jax/report/visualize.py, plots.py).
  c.eval.picture_min_side_px = 512      # small inputs are enlarged to this so labels stay readable
  c.eval.small_object_px = 32           # sheet.jpg shows images with most missed objects under this first
  c.eval.sheet_columns = 2              # panels (prediction | ground truth) per row of sheet.jpg
  # Buckets of the object's longer side (px of the evaluated image) for AP by size and the plots:
  # (name, lowest, highest), lowest <= size < highest.
  c.eval.size_buckets_px = (("tiny", 0.0, 16.0), ("small", 16.0, 32.0), ("medium", 32.0, 96.0),
                            ("large", 96.0, float("inf")))
  c.eval.tiled = ml_collections.ConfigDict()
  c.eval.tiled.enabled = False          # tiles of the input size over large images (TT100K)
  c.eval.tiled.overlap_px = 64

  # ---- export for deployment: --mode=export (mdssd_jax/run/export.py) --------------------------------
  c.export = ml_collections.ConfigDict()
  c.export.formats = ("saved_model", "tflite", "jax")   # what --mode=export writes (--formats)
  # Platforms the SavedModel's and the jax.export artifact's XLA programs are lowered for (any
  # machine can lower for all); a program only runs on a platform it was lowered for.
  c.export.platforms = ("cpu", "cuda", "tpu")
  # TFLite weights: "none" (float32), "float16" (half the file; computes in float32 on CPU) or
  # "dynamic_range" (int8 weights, float activations): --tflite_quantization.
  c.export.tflite_quantization = "none"

  # ---- evaluators: one entry each, big_vision style (mdssd_jax/evaluation/__init__.py) ---------
  c.evals = ml_collections.ConfigDict()
  c.evals.voc = voc_eval(use_07_metric=True)
  return c


def _eval_entry(kind, split, every_steps, max_images, num_pictures, **options):
  return ml_collections.ConfigDict(dict(type=kind, split=split, every_steps=every_steps,
                                        max_images=max_images, num_pictures=num_pictures, **options))


def voc_eval(use_07_metric, split="", every_steps=10_000, max_images=0, num_pictures=8):
  """A VOC evaluator entry: AP@0.5 with the devkit's rules (docs/evaluation.md).

  split "" = config.data.eval_split; every_steps 0 = only at the end of training; max_images 0 = all.
  use_07_metric: VOC2007's 11-point AP (True) or the area under the precision envelope (False).
  """
  return _eval_entry("voc", split, every_steps, max_images, num_pictures,
                     iou_threshold=0.5, use_07_metric=use_07_metric)


def coco_eval(split="", every_steps=50_000, max_images=0, num_pictures=8):
  """A COCO evaluator entry: pycocotools' twelve numbers (AP, AP50, AP75, AP_small, ...).

  coco_backend "pycocotools" | "faster_coco_eval": the same twelve numbers; faster_coco_eval is
  ~2.7x faster (benchmarks/bench_eval.py) but needs `pip install faster-coco-eval`.
  """
  return _eval_entry("coco", split, every_steps, max_images, num_pictures,
                     coco_backend="pycocotools")


def data_eval(split="", every_steps=2_000, max_images=0, num_pictures=8):
  """An evaluator entry whose metric follows the data (type "auto", mdssd_jax/run/data_config.py):
  COCO's twelve numbers for a COCO JSON source (its category ids), VOC mAP@0.5 (area under the
  precision envelope) for YOLO and VOC sources; AP by object size for all."""
  return _eval_entry("auto", split, every_steps, max_images, num_pictures, iou_threshold=0.5,
                     use_07_metric=False, coco_backend="pycocotools")


def custom(c):
  """A user's own files (docs/your_data.md): classes, class count and metric follow the data.

  The schedule is a starting point for a few thousand images fine-tuned from trained weights
  (config.model.init_from): SGD with Caffe's solver details at lr 1e-3, batch 32, 12k steps, decays
  at 2/3 and 5/6, evaluated every 2000 steps on the eval split. A larger data set or training from
  ImageNet weights wants more steps (the VOC recipe: 120k).
  """
  c.model.num_classes = 0               # 0 = the data set's class count (a count set here must match)
  c.data.name = "custom"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.max_boxes = 128                # small-object data sets are crowded (VisDrone: 50+ per image)
  c.evals = ml_collections.ConfigDict(dict(eval=data_eval()))
  c.eval.best_metric = "eval/auto"      # the metric's headline: AP (COCO JSON) or mAP (YOLO, VOC)
  c.eval.pre_nms_top_k = 400
  c.eval.top_k = 200
  c.train.global_batch_size = 32
  c.train.num_steps = 12_000
  c.train.base_lr = 1e-3
  c.train.lr_decay_steps = (8_000, 10_000)
  c.train.checkpoint_every_steps = 2_000
  caffe_sgd_recipe(c)


def tt100k_eval(split="", every_steps=10_000, max_images=0, num_pictures=8):
  """A TT100K evaluator entry: the official matching (IoU > 0.5, same class), size buckets by the
  box's longer side, precision/recall of detections scoring >= score_threshold, and mAP."""
  return _eval_entry("tt100k", split, every_steps, max_images, num_pictures,
                     iou_threshold=0.5, score_threshold=0.5, use_07_metric=False)


def ssd300_anchors(c, min_sizes=(30, 60, 111, 162, 213, 264), max_sizes=(60, 111, 162, 213, 264, 315)):
  """SSD300 default boxes; COCO passes its own sizes."""
  c.anchors.feature_sizes = (38, 19, 10, 5, 3, 1)
  c.anchors.steps = (8, 16, 32, 64, 100, 300)
  c.anchors.min_sizes = min_sizes
  c.anchors.max_sizes = max_sizes
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def ssd512_anchors(c, min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
                   max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6)):
  c.anchors.feature_sizes = (64, 32, 16, 8, 4, 2, 1)
  c.anchors.steps = (8, 16, 32, 64, 128, 256, 512)
  c.anchors.min_sizes = min_sizes
  c.anchors.max_sizes = max_sizes
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


def ssd300(c):
  c.model.architecture = "ssd"
  c.model.input_size_px = 300
  c.model.extras = SSD300_EXTRAS
  c.model.fusions = ()
  c.model.head_sources = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
  ssd300_anchors(c)


def ssd512(c):
  c.model.architecture = "ssd"
  c.model.input_size_px = 512
  c.model.extras = SSD512_EXTRAS
  c.model.fusions = ()
  c.model.head_sources = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2")
  ssd512_anchors(c)


def mdssd300(c, finest=(15, 30), min_sizes=(30, 60, 111, 162, 213, 264),
             max_sizes=(60, 111, 162, 213, 264, 315)):
  """MDSSD300: Fusion Modules 1-3 replace conv4_3/conv7 as heads (seven heads, docs/model.md).

  The paper gives no default boxes for the 75x75 map: SSD's ladder extended one rung down (`finest`
  = (min, max) size in pixels); the ratio {2} on the two finest maps.
  """
  c.model.architecture = "mdssd"
  c.model.input_size_px = 300
  c.model.extras = SSD300_EXTRAS
  c.model.fusions = MDSSD_FUSIONS
  c.model.head_sources = ("fusion1", "fusion2", "fusion3", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
  c.anchors.feature_sizes = (75, 38, 19, 10, 5, 3, 1)
  c.anchors.steps = (4, 8, 16, 32, 64, 100, 300)
  c.anchors.min_sizes = (finest[0],) + tuple(min_sizes)
  c.anchors.max_sizes = (finest[1],) + tuple(max_sizes)
  c.anchors.aspect_ratios = ((2,), (2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def mdssd512(c, finest=(20.48, 35.84), min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
             max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6)):
  """MDSSD512: our reading of the paper's "tiny modifications": fusions at 128/64/32 + conv8_2..conv12_2."""
  c.model.architecture = "mdssd"
  c.model.input_size_px = 512
  c.model.extras = SSD512_EXTRAS
  c.model.fusions = MDSSD_FUSIONS
  c.model.head_sources = ("fusion1", "fusion2", "fusion3", "conv8_2", "conv9_2", "conv10_2",
                          "conv11_2", "conv12_2")
  c.anchors.feature_sizes = (128, 64, 32, 16, 8, 4, 2, 1)
  c.anchors.steps = (4, 8, 16, 32, 64, 128, 256, 512)
  c.anchors.min_sizes = (finest[0],) + tuple(min_sizes)
  c.anchors.max_sizes = (finest[1],) + tuple(max_sizes)
  c.anchors.aspect_ratios = ((2,), (2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


def caffe_sgd_recipe(c):
  """Caffe SSD's solver details (ssd_pascal.py, model_libs.py): biases at 2x lr without weight decay,
  the L2Norm scales decayed, momentum over lr-scaled gradients; VOC/COCO/TT100K paper configs."""
  c.train.optimizer = "sgd"
  c.train.bias_lr_multiplier = 2.0
  c.train.bias_weight_decay = False
  c.train.l2norm_scale_weight_decay = True
  c.train.momentum_form = "caffe"


def voc(c):
  """VOC07+12 trainval -> VOC07 test, the paper's VOC protocol (docs/training_recipe.md)."""
  c.model.num_classes = 20
  c.data.name = "voc/2007+2012"
  c.data.train_split = "trainval"
  c.data.eval_split = "test"
  c.data.max_boxes = 64
  c.evals = ml_collections.ConfigDict(dict(voc=voc_eval(use_07_metric=True)))
  c.eval.best_metric = "voc/mAP"
  c.train.global_batch_size = 32
  c.train.num_steps = 120_000
  c.train.base_lr = 1e-3
  c.train.lr_decay_steps = (80_000, 100_000)
  c.eval.pre_nms_top_k = 400            # Caffe's DetectionOutput: top 400 per class before NMS
  c.eval.top_k = 200
  caffe_sgd_recipe(c)


def coco(c):
  """COCO 2017 train -> val, mmdetection's schedule (120 epochs at batch 64, lr 2e-3)."""
  c.model.num_classes = 80
  c.data.name = "coco/2017"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.max_boxes = 128
  c.data.keep_difficult = True
  c.evals = ml_collections.ConfigDict(dict(coco=coco_eval(every_steps=50_000)))
  c.eval.best_metric = "coco/AP"
  c.eval.pre_nms_top_k = 400
  c.train.global_batch_size = 64
  c.train.reference_batch_size = 64
  c.train.base_lr = 2e-3
  steps_per_epoch = 118_287 // 64
  c.train.num_steps = 120 * steps_per_epoch
  c.train.lr_decay_steps = (80 * steps_per_epoch, 110 * steps_per_epoch)
  caffe_sgd_recipe(c)
