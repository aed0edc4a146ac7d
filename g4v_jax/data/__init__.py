"""Host-side data loading: video/image decoding and CLIP preprocessing geometry."""
