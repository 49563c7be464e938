"""Pictures of a run (matplotlib optional): the AdaLoRA rank heatmap."""
