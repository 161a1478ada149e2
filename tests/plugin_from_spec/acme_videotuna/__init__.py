"""ACME's contributions to videotuna: factories are "module:attr" strings, so listing them imports nothing."""
