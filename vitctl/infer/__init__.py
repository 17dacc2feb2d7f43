"""Using a model: one way to run any checkpoint on either backend (runner), and the apps on top of it:
eval (accuracy on a labelled split), predict (top-k of image files), embed (features to a file),
export (a graph for onnxruntime or torch.export). probe extracts its features through the runner too."""
