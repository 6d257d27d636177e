/* The CLIP BPE merges and the SD 1.x / 2.x tokenizer configurations (data/), linked into the
   binary so that a single-file base needs no tokenizer folder and sdtrain no data directory.
   Each blob is NUL-terminated; bundled_tokenizer.cpp reads them. The assembler finds the
   files on its include path (-I data/, src/CMakeLists.txt). */
#define BLOB(name, file)            \
  .global name;                     \
  .balign 16;                       \
  name:                             \
  .incbin file;                     \
  .byte 0

  .section .rodata
  BLOB(sdtrain_clip_merges, "clip/merges.txt")
  BLOB(sdtrain_sd1_tokenizer_config, "tokenizer/sd1/tokenizer_config.json")
  BLOB(sdtrain_sd1_special_tokens_map, "tokenizer/sd1/special_tokens_map.json")
  BLOB(sdtrain_sd2_tokenizer_config, "tokenizer/sd2/tokenizer_config.json")
  BLOB(sdtrain_sd2_special_tokens_map, "tokenizer/sd2/special_tokens_map.json")
  .section .note.GNU-stack,"",@progbits
