# A small VMamba Mask R-CNN that learns the synthetic shapes dataset on a 2-core CPU in minutes.
# Generate the data first: `python -m vmamba_mm.datasets --out data/shapes --seed 0`
# (or run `make demo`, which does everything). The data root is relative to the working directory;
# override it with the environment variable VMAMBA_MM_SHAPES_ROOT (keep the trailing slash).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['vmamba_mm'], allow_failed_imports=False)

data_root = '{{$VMAMBA_MM_SHAPES_ROOT:data/shapes/}}'
classes = ('circle', 'square', 'triangle')
palette = [(220, 20, 60), (0, 130, 230), (250, 170, 30)]
image_size = 128
max_iters = 400
batch_size = 4
# Narrow and shallow: the shapes need little capacity and the demo must fit in minutes on a CPU.
dims = [32, 64, 128, 256]
neck_channels = 64

model = dict(
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
    neck=dict(in_channels=dims, out_channels=neck_channels),
    rpn_head=dict(
        in_channels=neck_channels,
        feat_channels=neck_channels,
        # Shapes are 25-60 px wide: anchors of 16-64 px on the finest levels fit them.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=neck_channels),
        bbox_head=dict(in_channels=neck_channels, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=neck_channels),
        mask_head=dict(
            num_convs=2,
            in_channels=neck_channels,
            conv_out_channels=neck_channels,
            num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        # Few RoIs per image: the pictures hold at most 4 objects and every RoI costs CPU time.
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# Iteration-based: a CPU demo is measured in steps, not epochs. One evaluation at the end.
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min=1e-5, by_epoch=False, begin=0,
         end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)

# Seeded so the demo figures in docs/BENCHMARKS.md are reproducible run to run.
randomness = dict(seed=0)
# Random-number states in every checkpoint: --resume continues bit-exactly
# (vmamba_mm/engine/resume.py; tools/train.py adds this hook to configs that lack it).
custom_hooks = [dict(type='ExactResumeHook')]
