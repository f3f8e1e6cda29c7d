"""The bundles as products: registry (``registry``), MONAI Label serving helpers (``serving``), Model Zoo readiness
(``readiness``) and export (``export``). Submodules are imported on use; nothing here imports MONAI Label."""
