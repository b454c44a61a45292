# VMamba-S[s2l15] Mask R-CNN, COCO 3x multi-scale (official: 70M, 384G, box AP 49.9 / mask AP 44.2).
_base_ = "./mask-rcnn_vmamba-t_fpn_ms-crop-3x_coco.py"

model = dict(
    backbone=dict(
        arch="small-s2l15",
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth")))
