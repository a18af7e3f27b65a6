"""kvdrive storage engine: codecs, compressed host pool, LMDB-indexed segment store. No SGLang import."""
