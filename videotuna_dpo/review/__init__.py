"""``videotuna review``: an offline page to look at preference pairs (or eval samples) and label them by hand."""
