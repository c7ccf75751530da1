"""Make the IAM user whose access key the broker will hold, and a role it may assume, in a
moto server with IAM authentication on (its first five requests are let through
unauthenticated to allow this).

usage: bootstrap.py ENDPOINT CA_FILE   (prints: <access key id> <secret access key>)
"""
import sys

import boto3

endpoint, ca = sys.argv[1], sys.argv[2]
# Any credentials: moto does not check these first requests (INITIAL_NO_AUTH_ACTION_COUNT).
iam = boto3.client(
    "iam",
    endpoint_url=endpoint,
    verify=ca,
    region_name="us-east-1",
    aws_access_key_id="AKIAAAAAAAAAAAAAAAAA",
    aws_secret_access_key="b" * 40,
)
iam.create_user(UserName="agent")
key = iam.create_access_key(UserName="agent")["AccessKey"]
iam.put_user_policy(
    UserName="agent",
    PolicyName="everything",
    PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
)
iam.create_role(
    RoleName="agent-role",
    AssumeRolePolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:user/agent"},"Action":"sts:AssumeRole"}]}',
)
iam.put_role_policy(
    RoleName="agent-role",
    PolicyName="everything",
    PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
)
print(key["AccessKeyId"], key["SecretAccessKey"])
