"""One file per distillation method; each registers itself with @register_distiller."""
