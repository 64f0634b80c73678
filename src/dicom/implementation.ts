/** How the gateway identifies itself in A-ASSOCIATE user information (PS3.7 D.3.3.2, D.3.3.3). */
import { VERSION } from "../shared/version.ts";

/** Our Implementation Class UID: a UUID-derived UID (PS3.5 B.2), fixed for this product. */
export const IMPLEMENTATION_CLASS_UID = "2.25.253501204535763557447548572531181061881";

/** At most 16 characters of the Default Character Repertoire. */
export const IMPLEMENTATION_VERSION_NAME = `DICOMGW_${VERSION}`.slice(0, 16);
