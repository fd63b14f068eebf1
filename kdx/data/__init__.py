"""LightningDataModules: class folders, Fashion-MNIST, synthetic patterns (and face data, see kdx.data.face)."""
from kdx.data.base import KdxDataModule
from kdx.data.fashion_mnist import FashionMNISTDataModule
from kdx.data.image_folder import ImageFolderDataModule, load_image, scan_class_folders, stratified_split
from kdx.data.synthetic import SyntheticDataModule, make_synthetic_images

__all__ = [
    "FashionMNISTDataModule", "ImageFolderDataModule", "KdxDataModule", "SyntheticDataModule", "load_image",
    "make_synthetic_images", "scan_class_folders", "stratified_split",
]
