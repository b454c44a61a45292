# VMamba-T[s1l8] Mask R-CNN, COCO 3x with multi-scale + crop augmentation (official: 50M, 271G,
# box AP 48.8 / mask AP 43.7). Recipe from mmdet's Swin-T 3x config: DETR-style multi-scale resize
# and random crop, 36 epochs, lr steps after epochs 27 and 33, otherwise as the 1x recipe.
# Base of every other 3x config in this folder.
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py"

custom_imports = dict(imports=["vmamba_mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="VMamba",
        arch="tiny",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type="Pretrained",
                      checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth")),
    neck=dict(in_channels=[96, 192, 384, 768]))

# Seeded, so runs repeat and --resume continues bit-exactly (the hook below saves every rank's
# random-number states in each checkpoint; vmamba_mm/engine/resume.py). diff_rank_seed: rank r
# seeds its generators with seed + r, so the GPUs draw independent flips, crops and drop paths
# instead of identical ones; the samplers still share one seed and split the data without overlap.
# Exact except for the draws inside the persistent data-loader workers of this epoch-based loop:
# they restart from the seed on resume (set train_dataloader.persistent_workers=False to avoid it).
randomness = dict(seed=0, diff_rank_seed=True)
custom_hooks = [dict(type="ExactResumeHook")]
