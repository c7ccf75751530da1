"""Check a presigned request as S3 would, with botocore's own signer (an implementation
independent of the broker's): sign the same request again with the given credentials, at the
date and expiry the URL carries, and compare the signatures.

usage: verify_presigned.py HOST TARGET ACCESS_KEY_ID SECRET REGION   (prints signature-ok or
signature-bad)
"""
import datetime
import sys
from unittest import mock
from urllib.parse import parse_qsl, urlencode, quote

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

host, target, key_id, secret, region = sys.argv[1:6]
path, _, query = target.partition("?")
params = parse_qsl(query, keep_blank_values=True)
values = dict(params)
auth_params = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
               "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"}
rest = [(k, v) for k, v in params if k not in auth_params]
url = "https://%s%s" % (host, path)
if rest:
    url += "?" + urlencode(rest, quote_via=quote)
request = AWSRequest(method="GET", url=url, headers={})
when = datetime.datetime.strptime(values["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
signer = botocore.auth.S3SigV4QueryAuth(
    Credentials(key_id, secret, values.get("X-Amz-Security-Token")), "s3", region,
    expires=int(values["X-Amz-Expires"]))
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
    signer.add_auth(request)
expected = dict(parse_qsl(request.url.partition("?")[2]))["X-Amz-Signature"]
print("signature-ok" if expected == values.get("X-Amz-Signature") else "signature-bad")
