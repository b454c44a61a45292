# VMamba-B[s2l15] UperNet, ADE20K 160k (official: 122M, 1170G, mIoU 51.0 / 51.6 MS).
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="base-s2l15",
        drop_path_rate=0.6,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth")),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
