// A static Go agent for tests/tests/aws.rs: STS GetCallerIdentity signed by hand with SigV4
// (standard library only), with the credentials from its environment. Go programs cannot
// take libbroker.so, so under `broker run` this goes through the CONNECT fallback.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func hmacSHA256(key []byte, data string) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(data))
	return mac.Sum(nil)
}

func sha256Hex(data string) string {
	sum := sha256.Sum256([]byte(data))
	return hex.EncodeToString(sum[:])
}

func main() {
	id, secret := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
	region := os.Getenv("AWS_DEFAULT_REGION")
	fmt.Println("id=" + id)
	host := "sts." + region + ".amazonaws.com"
	body := "Action=GetCallerIdentity&Version=2011-06-15"
	contentType := "application/x-www-form-urlencoded; charset=utf-8"
	now := time.Now().UTC()
	amzDate, date := now.Format("20060102T150405Z"), now.Format("20060102")
	scope := date + "/" + region + "/sts/aws4_request"
	canonical := strings.Join([]string{
		"POST", "/", "",
		"content-type:" + contentType, "host:" + host, "x-amz-date:" + amzDate, "",
		"content-type;host;x-amz-date", sha256Hex(body),
	}, "\n")
	toSign := "AWS4-HMAC-SHA256\n" + amzDate + "\n" + scope + "\n" + sha256Hex(canonical)
	key := hmacSHA256([]byte("AWS4"+secret), date)
	for _, part := range []string{region, "sts", "aws4_request"} {
		key = hmacSHA256(key, part)
	}
	signature := hex.EncodeToString(hmacSHA256(key, toSign))
	req, _ := http.NewRequest("POST", "https://"+host+"/", strings.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("X-Amz-Date", amzDate)
	req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential="+id+"/"+scope+
		", SignedHeaders=content-type;host;x-amz-date, Signature="+signature)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(3)
	}
	answer, _ := io.ReadAll(resp.Body)
	fmt.Println("status:", resp.StatusCode)
	fmt.Println(string(answer))
	if resp.StatusCode != 200 {
		os.Exit(4)
	}
}
