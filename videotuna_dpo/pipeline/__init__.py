"""The steps behind the `videotuna` verbs: generate, score, pairs, eval."""
