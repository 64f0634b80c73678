/**
 * Credentials out of URLs shown to people: `http://user:secret@orthanc:8042` is shown as
 * `http://(credentials hidden)@orthanc:8042`, in messages, logs and `check-config`. The configuration moves
 * them out of `Gateway.Orthanc.Url` at load (config/load.ts), so the URL the gateway keeps has none; this is
 * for the text around it (an invalid URL in an error, an error message that quotes one).
 */

const CREDENTIALS = /(\b[a-z][a-z0-9+.-]*:\/\/)[^/?#@\s]*@/gi;

/** `text` with the user:password part of every URL in it replaced. */
export function redactUrlCredentials(text: string): string {
  return text.replace(CREDENTIALS, "$1(credentials hidden)@");
}
