/**
 * dcmjs ships no type declarations: its default export is typed `any` here, and each module that
 * uses it narrows what it needs (see dicom/dictionary.ts, its only user: the data dictionary).
 */
declare module "dcmjs";
