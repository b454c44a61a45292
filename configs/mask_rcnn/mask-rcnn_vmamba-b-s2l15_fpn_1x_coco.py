# VMamba-B[s2l15] Mask R-CNN, COCO 1x (official: 108M, 485G, box AP 49.2 / mask AP 44.1).
_base_ = "./mask-rcnn_vmamba-t_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        arch="base-s2l15",
        drop_path_rate=0.6,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth")),
    neck=dict(in_channels=[128, 256, 512, 1024]))
