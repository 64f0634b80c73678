/**
 * JSON with comments, as accepted in Orthanc's configuration files:
 * `//` line comments, `/* *\/` block comments and (tolerated) trailing commas.
 *
 * `stripJsonc` blanks comments and trailing commas with spaces, keeping every
 * newline and every other character in place, so an offset in the stripped
 * text is the same line and column in the original file.
 *
 * `parseJsonc` parses with the engine's JSON.parse; when that fails it locates
 * the error itself (Bun's JSON.parse does not report positions, V8's wording
 * differs between versions) and throws a JsoncSyntaxError with line and column.
 */

export class JsoncSyntaxError extends Error {
  /** 1-based line of the error. */
  readonly line: number;
  /** 1-based column (UTF-16 code units) of the error. */
  readonly column: number;
  /** 0-based offset in the text. */
  readonly offset: number;
  /** The message without position. */
  readonly detail: string;

  constructor(text: string, offset: number, detail: string) {
    const { line, column } = lineColumn(text, offset);
    super(`${line}:${column}: ${detail}`);
    this.name = "JsoncSyntaxError";
    this.line = line;
    this.column = column;
    this.offset = offset;
    this.detail = detail;
  }
}

/** 1-based line and column of a 0-based offset (a CR LF pair counts as one line break). */
export function lineColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  const end = Math.min(offset, text.length);
  for (let i = 0; i < end; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x0a) {
      line++;
      lineStart = i + 1;
    } else if (c === 0x0d && text.charCodeAt(i + 1) !== 0x0a) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}

const isNewline = (c: string) => c === "\n" || c === "\r";
const isJsonSpace = (c: string) => c === " " || c === "\t" || c === "\n" || c === "\r";

/**
 * Replaces comments (and, unless `trailingCommas` is false, trailing commas
 * before `}` or `]`) with spaces. Newlines are kept, so positions do not move.
 * A leading byte order mark becomes a space too.
 * Throws JsoncSyntaxError on an unterminated block comment.
 */
export function stripJsonc(text: string, opts: { trailingCommas?: boolean } = {}): string {
  const out: string[] = [];
  let i = 0;
  const n = text.length;
  if (text.charCodeAt(0) === 0xfeff) {
    out.push(" ");
    i = 1;
  }
  while (i < n) {
    const c = text[i]!;
    if (c === '"') {
      // Copy a string literal verbatim, so "http://host" keeps its "//".
      const start = i;
      i++;
      while (i < n) {
        const d = text[i]!;
        if (d === "\\") i += 2;
        else if (d === '"') {
          i++;
          break;
        } else if (isNewline(d)) break; // unterminated; left for the parser to report
        else i++;
      }
      out.push(text.slice(start, Math.min(i, n)));
      continue;
    }
    if (c === "/" && text[i + 1] === "/") {
      while (i < n && !isNewline(text[i]!)) {
        out.push(" ");
        i++;
      }
      continue;
    }
    if (c === "/" && text[i + 1] === "*") {
      const close = text.indexOf("*/", i + 2);
      if (close < 0) throw new JsoncSyntaxError(text, i, "unterminated /* comment; expected */");
      for (let j = i; j < close + 2; j++) out.push(isNewline(text[j]!) ? text[j]! : " ");
      i = close + 2;
      continue;
    }
    out.push(c);
    i++;
  }
  const stripped = out.join("");
  return opts.trailingCommas === false ? stripped : blankTrailingCommas(stripped);
}

/** Replaces each `,` that follows a value and precedes (after whitespace) `}` or `]` with a space. Input has no comments. */
function blankTrailingCommas(text: string): string {
  let result: string[] | undefined;
  const n = text.length;
  for (let i = 0; i < n; i++) {
    const c = text[i]!;
    if (c === '"') {
      i++;
      while (i < n && text[i] !== '"' && !isNewline(text[i]!)) i += text[i] === "\\" ? 2 : 1;
      continue;
    }
    if (c !== ",") continue;
    let k = i - 1;
    while (k >= 0 && isJsonSpace(text[k]!)) k--;
    if (k < 0 || text[k] === "{" || text[k] === "[" || text[k] === ",") continue; // not after a value
    let j = i + 1;
    while (j < n && isJsonSpace(text[j]!)) j++;
    if (text[j] === "}" || text[j] === "]") {
      result ??= text.split("");
      result[i] = " ";
    }
  }
  return result ? result.join("") : text;
}

/** Parses JSONC text. Throws JsoncSyntaxError (with line and column) on a syntax error. */
export function parseJsonc(text: string): unknown {
  const stripped = stripJsonc(text);
  try {
    return JSON.parse(stripped);
  } catch (err) {
    const found = locateJsonError(stripped);
    if (found) throw new JsoncSyntaxError(text, found.offset, found.detail);
    // The locator found nothing wrong but the engine did: report the engine's words.
    throw new JsoncSyntaxError(text, 0, err instanceof Error ? err.message : String(err));
  }
}

/** What the character at `i` looks like in an error message. */
function describeAt(text: string, i: number): string {
  if (i >= text.length) return "end of file";
  const c = text[i]!;
  if (c === "\n" || c === "\r") return "end of line";
  const m = /^[A-Za-z0-9_$.+-]+/.exec(text.slice(i, i + 24));
  if (m && m[0].length > 1) return JSON.stringify(m[0]);
  return JSON.stringify(c);
}

/**
 * A strict JSON syntax checker: returns the first error (offset and message), or
 * undefined when the text is valid JSON. Comments must already be stripped.
 */
export function locateJsonError(text: string): { offset: number; detail: string } | undefined {
  let i = 0;
  const n = text.length;
  class Fail {
    constructor(readonly offset: number, readonly detail: string) {}
  }
  const fail = (offset: number, expected: string): never => {
    throw new Fail(offset, `unexpected ${describeAt(text, offset)}; expected ${expected}`);
  };
  const ws = () => {
    while (i < n && isJsonSpace(text[i]!)) i++;
  };
  const string = () => {
    // text[i] === '"'
    const start = i;
    i++;
    for (;;) {
      if (i >= n || isNewline(text[i]!)) {
        throw new Fail(start, "unterminated string; expected a closing \"");
      }
      const c = text.charCodeAt(i);
      if (c === 0x22) {
        i++;
        return;
      }
      if (c < 0x20) throw new Fail(i, "control character in string; expected it escaped (e.g. \\t)");
      if (c === 0x5c) {
        const e = text[i + 1];
        if (e !== undefined && '"\\/bfnrt'.includes(e)) i += 2;
        else if (e === "u" && /^[0-9A-Fa-f]{4}$/.test(text.slice(i + 2, i + 6))) i += 6;
        else throw new Fail(i, "invalid escape in string; expected \\\" \\\\ \\/ \\b \\f \\n \\r \\t or \\uXXXX");
        continue;
      }
      i++;
    }
  };
  const value = (depth: number): void => {
    if (depth > 1000) throw new Fail(i, "nesting too deep");
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      ws();
      if (text[i] === "}") {
        i++;
        return;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail(i, "a property name in double quotes");
        string();
        ws();
        if (text[i] !== ":") fail(i, '":" after the property name');
        i++;
        value(depth + 1);
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "}") {
          i++;
          return;
        }
        fail(i, '"," or "}" after the property value');
      }
    }
    if (c === "[") {
      i++;
      ws();
      if (text[i] === "]") {
        i++;
        return;
      }
      for (;;) {
        value(depth + 1);
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "]") {
          i++;
          return;
        }
        fail(i, '"," or "]" after the array element');
      }
    }
    if (c === '"') return string();
    const rest = text.slice(i, i + 400);
    const num = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/.exec(rest);
    if (num) {
      i += num[0].length;
      return;
    }
    for (const lit of ["true", "false", "null"]) {
      if (rest.startsWith(lit)) {
        i += lit.length;
        return;
      }
    }
    fail(i, "a value (object, array, string, number, true, false or null)");
  };
  try {
    value(0);
    ws();
    if (i < n) fail(i, "end of file after the top-level value");
    return undefined;
  } catch (e) {
    if (e instanceof Fail) return { offset: e.offset, detail: e.detail };
    throw e;
  }
}
