"""LightningDataModules: CIFAR-10, scikit-learn digits and users' own image folders."""
