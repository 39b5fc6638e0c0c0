"""Input data: BEIR and training-pair readers, hard-negative mining, seqio tasks, resumable per-host input.

  beir            BEIR corpus / queries / qrels readers with validation, and the checksum-verified downloader
                  (no TensorFlow: evaluation and export use only this module).
  training_files  MS MARCO-style triples TSV and JSONL pair/triple readers (`skip_bad_lines`).
  mining          BEIR train qrels + corpus -> examples with BM25 (bm25s) hard negatives and random negatives.
  input_pipeline  `TrainInput` (what the trainer iterates) and the gin-configurable training sources.
  tasks           seqio Tasks / Mixture / `XTRFeatureConverter` over the same sources (imports TensorFlow).
"""
