"""embed package: the ImageBind model and the embed stage (plan, compute, write, query); pure, no Prefect."""
