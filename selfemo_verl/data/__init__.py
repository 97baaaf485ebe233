"""Training data (docs/method.md §7, §13); core, no verl, no ray. Two entry points:

    python -m selfemo_verl.data.prepare ...    raw ERC files -> D_0 {train,val,test}.parquet (data_prep/prepare_erc.py)
    python -m selfemo_verl.data.flywheel ...   round r's episode dumps + D_r -> D_{r+1}  (data_prep/flywheel.py)

- `parquet`: the row schema, the one parquet writer, the checked reader of a base D_r;
- `erc_data`, `erc_download`: the MELD / EmoryNLP / IEMOCAP readers and rows, the pinned downloads;
- `episode_dump`: the JSONL dump of training episodes (written by the trainer, read by the flywheel);
- `flywheel`: the rules that turn a round's episodes into the next round's data.

Importing the package imports none of them.
"""
