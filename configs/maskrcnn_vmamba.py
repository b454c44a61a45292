# Mask R-CNN with a VMamba-T backbone (arch "tiny" = VMamba-T[s1l8]) on COCO, 1x schedule.
# Official row: 50M params, 271G FLOPs at 1280x800, box AP 47.3 / mask AP 42.7.
#
# The recipe is inherited from mmdet's Swin-T Mask R-CNN 1x config, as in the official VMamba
# detection configs: AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 0.05, no weight decay for
# parameters whose name contains "norm"), linear warm-up over 1000 iterations, 12 epochs with the lr
# divided by 10 after epochs 8 and 11, 2 images per GPU on 8 GPUs.
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"

custom_imports = dict(imports=["vmamba_mm"], allow_failed_imports=False)

# ImageNet-1K checkpoint of VMamba-T[s1l8] (82.6 top-1). The URL downloads on first use; to train
# offline, fetch it once and put the local path here instead.
pretrained = ("https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"
              "vssm1_tiny_0230s_ckpt_epoch_264.pth")

model = dict(
    backbone=dict(
        _delete_=True,
        type="VMamba",
        arch="tiny",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type="Pretrained", checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

# Seeded, so runs repeat and --resume continues bit-exactly (the hook below saves every rank's
# random-number states in each checkpoint; vmamba_mm/engine/resume.py). diff_rank_seed: rank r
# seeds its generators with seed + r, so the GPUs draw independent flips, crops and drop paths
# instead of identical ones; the samplers still share one seed and split the data without overlap.
# Exact except for the draws inside the persistent data-loader workers of this epoch-based loop:
# they restart from the seed on resume (set train_dataloader.persistent_workers=False to avoid it).
randomness = dict(seed=0, diff_rank_seed=True)
custom_hooks = [dict(type="ExactResumeHook")]
