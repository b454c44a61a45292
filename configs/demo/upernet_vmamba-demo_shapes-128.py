# A small VMamba UperNet that learns the synthetic shapes dataset (ADE-style label maps) on a
# 2-core CPU in minutes. Generate the data first: `python -m vmamba_mm.datasets --out data/shapes`
# (or run `make demo`). The data root is relative to the working directory; override it with the
# environment variable VMAMBA_MM_SHAPES_ROOT.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['vmamba_mm'], allow_failed_imports=False)

data_root = '{{$VMAMBA_MM_SHAPES_ROOT:data/shapes/}}'
# Label maps store 0 = unlabeled, 1 = background, 2.. = shapes; reduce_zero_label maps them to
# 255 (ignored), 0, 1.. exactly as for ADE20K.
classes = ('background', 'circle', 'square', 'triangle')
palette = [(40, 40, 40), (220, 20, 60), (0, 130, 230), (250, 170, 30)]
image_size = 128
crop_size = (image_size, image_size)
max_iters = 400
batch_size = 4
dims = [32, 64, 128, 256]
# Plain BN: SyncBN needs CUDA, and the demo also runs under CPU DDP.
norm_cfg = dict(type='BN', requires_grad=True)
# Background covers most pixels; training on the hardest pixels (OHEM) keeps a short training
# from collapsing a shape class into background (seen without it: triangle IoU 0 in some runs).
# (mmseg 1.2.2's class_weight cannot be used instead: it fails on ignored (padded) pixels.)
pixel_sampler = dict(type='OHEMPixelSampler', thresh=0.7, min_kept=4096)

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch=dict(
            dims=dims,
            depths=[1, 1, 2, 1],
            d_state=1,
            ssm_ratio=1.0,
            mlp_ratio=2.0,
            gated=False,
            conv_bias=False,
            patch_embed='two-conv',
            downsample='conv3'),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        channel_first=True,
        scan_backend='torch'),
    decode_head=dict(
        in_channels=dims,
        channels=64,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
        sampler=pixel_sampler),
    auxiliary_head=dict(
        in_channels=dims[2],
        channels=32,
        num_classes=len(classes),
        norm_cfg=norm_cfg))

dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in (1.0, 1.5)],
            [
                dict(type='RandomFlip', prob=0.0, direction='horizontal'),
                dict(type='RandomFlip', prob=1.0, direction='horizontal'),
            ],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ]),
]
seg_dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **seg_dataset,
        data_prefix=dict(img_path='images/train', seg_map_path='seg/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **seg_dataset,
        data_prefix=dict(img_path='images/val', seg_map_path='seg/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=1e-5, power=1.0, by_epoch=False, begin=50, end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)

# Seeded so the demo figures in docs/BENCHMARKS.md are reproducible run to run.
randomness = dict(seed=0)
# Random-number states in every checkpoint: --resume continues bit-exactly
# (vmamba_mm/engine/resume.py; tools/train.py adds this hook to configs that lack it).
custom_hooks = [dict(type='ExactResumeHook')]
