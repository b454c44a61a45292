# VMamba-S[s2l15] UperNet, ADE20K 160k (official: 82M, 1028G, mIoU 50.6 / 51.2 MS).
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="small-s2l15",
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth")))
