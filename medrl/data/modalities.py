"""One DataModule per MedMNIST 2D modality: the generic one with its ``flag`` preset.

Usable from YAML as ``data: {class_path: medrl.data.modalities.PneumoniaMNIST, init_args: {...}}``.
"""

from __future__ import annotations

from medrl.data.medmnist import MedMNISTDataModule


class PathMNIST(MedMNISTDataModule):
    """PathMNIST: colorectal cancer histology, 9 tissue types, RGB."""

    default_flag = "pathmnist"


class ChestMNIST(MedMNISTDataModule):
    """ChestMNIST: chest X-ray, 14 findings, multi-label."""

    default_flag = "chestmnist"


class DermaMNIST(MedMNISTDataModule):
    """DermaMNIST: dermatoscopy, 7 lesion classes, RGB."""

    default_flag = "dermamnist"


class OCTMNIST(MedMNISTDataModule):
    """OCTMNIST: retinal OCT, 4 classes."""

    default_flag = "octmnist"


class PneumoniaMNIST(MedMNISTDataModule):
    """PneumoniaMNIST: paediatric chest X-ray, binary (normal, pneumonia)."""

    default_flag = "pneumoniamnist"


class RetinaMNIST(MedMNISTDataModule):
    """RetinaMNIST: fundus photography, 5 retinopathy grades, ordinal, RGB."""

    default_flag = "retinamnist"


class BreastMNIST(MedMNISTDataModule):
    """BreastMNIST: breast ultrasound, binary (malignant, normal/benign)."""

    default_flag = "breastmnist"


class BloodMNIST(MedMNISTDataModule):
    """BloodMNIST: blood cell microscopy, 8 cell types, RGB."""

    default_flag = "bloodmnist"


class TissueMNIST(MedMNISTDataModule):
    """TissueMNIST: kidney cortex microscopy, 8 cell types."""

    default_flag = "tissuemnist"


class OrganAMNIST(MedMNISTDataModule):
    """OrganAMNIST: abdominal CT, axial, 11 organs."""

    default_flag = "organamnist"


class OrganCMNIST(MedMNISTDataModule):
    """OrganCMNIST: abdominal CT, coronal, 11 organs."""

    default_flag = "organcmnist"


class OrganSMNIST(MedMNISTDataModule):
    """OrganSMNIST: abdominal CT, sagittal, 11 organs."""

    default_flag = "organsmnist"


MODALITIES: dict[str, type[MedMNISTDataModule]] = {cls.default_flag: cls for cls in (
    PathMNIST,
    ChestMNIST,
    DermaMNIST,
    OCTMNIST,
    PneumoniaMNIST,
    RetinaMNIST,
    BreastMNIST,
    BloodMNIST,
    TissueMNIST,
    OrganAMNIST,
    OrganCMNIST,
    OrganSMNIST,
)}  # fmt: skip
