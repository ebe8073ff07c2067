"""From a document completer to a model you can talk to: conversations as data, the one chat
template, the built-in fine-tuning set, and supervised fine-tuning (`sft`) on the training loop."""
