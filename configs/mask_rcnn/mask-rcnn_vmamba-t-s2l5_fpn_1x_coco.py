# VMamba-T[s2l5] Mask R-CNN, COCO 1x (official: 50M, 270G, box AP 47.4 / mask AP 42.7).
_base_ = "./mask-rcnn_vmamba-t_fpn_1x_coco.py"

model = dict(
    backbone=dict(
        arch="tiny-s2l5",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth")))
