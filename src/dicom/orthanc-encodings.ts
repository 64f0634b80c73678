/** Orthanc's `Encoding` enumeration: the encodings it converts DICOM text from (the names of its `DefaultEncoding` option). */
export type OrthancEncoding =
  | "Ascii"
  | "Utf8"
  | "Latin1"
  | "Latin2"
  | "Latin3"
  | "Latin4"
  | "Latin5"
  | "Cyrillic"
  | "Windows1251"
  | "Arabic"
  | "Greek"
  | "Hebrew"
  | "Thai"
  | "Japanese"
  | "Chinese"
  | "Korean"
  | "JapaneseKanji"
  | "SimplifiedChinese";

export const ORTHANC_ENCODINGS: readonly OrthancEncoding[] = [
  "Ascii",
  "Utf8",
  "Latin1",
  "Latin2",
  "Latin3",
  "Latin4",
  "Latin5",
  "Cyrillic",
  "Windows1251",
  "Arabic",
  "Greek",
  "Hebrew",
  "Thai",
  "Japanese",
  "Chinese",
  "Korean",
  "JapaneseKanji",
  "SimplifiedChinese",
];
