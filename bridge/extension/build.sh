#!/usr/bin/env bash
# build.sh [OUT.jar] -- build the ZEUS QuPath extension jar with javac and jar only (no network build tool).
#
# Compiles src/main/java against QuPath's jars, bundles the Groovy scripts of groovy/ (the keep-edits and label
# rules live there; the extension runs them) and zeus-extension.properties (zeus-qupath's version, the service
# API version of bridge/service_schema.py). Default OUT: bridge/extension/build/zeus-qupath-extension-<version>.jar
#
# QuPath's jars, the first that is set or found:
#   QUPATH_APP_DIR   a QuPath installation's lib/app folder (QuPath 0.4-0.7; has QuPath, JavaFX, Gson, Groovy jars)
#   QUPATH_GUI_DIR   QuPath 0.4.4's GUI built for the tests (default ../shared/qupath/gui-0.4.4 beside the checkout),
#                    with QUPATH_CORE_DIR (default its ../0.4.4) and Debian's JavaFX jars (/usr/share/java)
# JAVA_HOME: a JDK 17+ (default Debian's OpenJDK 17). Classes are compiled --release ${JAVA_RELEASE:-17}: QuPath
# 0.4/0.5 run Java 17, 0.6/0.7 run 21/25 and load release-17 classes too, so one jar serves 0.4-0.7. Against a
# QuPath 0.6/0.7 installation (its jars are release 21/25) set JAVA_RELEASE=21 (that jar needs QuPath 0.6+).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
J=${JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}/bin
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/zeus_qupath/__init__.py")
API=$(sed -n 's/^API_VERSION = \([0-9][0-9]*\)$/\1/p' "$REPO/bridge/service_schema.py")
[ -n "$VERSION" ] && [ -n "$API" ] || { echo "build.sh: cannot read the version or API_VERSION" >&2; exit 2; }
OUT=${1:-$HERE/build/zeus-qupath-extension-$VERSION.jar}

if [ -n "${QUPATH_APP_DIR:-}" ]; then
  CP=$(ls "$QUPATH_APP_DIR"/*.jar | tr '\n' ':')
else
  G=${QUPATH_GUI_DIR:-$REPO/../shared/qupath/gui-0.4.4}
  CORE=${QUPATH_CORE_DIR:-$G/../0.4.4}
  [ -d "$G" ] || { echo "build.sh: no QuPath jars: set QUPATH_APP_DIR to your QuPath's lib/app folder" >&2; exit 2; }
  CP="$G/qupath-gui-fx-0.4.4.jar:$G/qupath-core-processing-0.4.4-partial.jar:$CORE/qupath-core-0.4.4.jar"
  CP="$CP:$(ls "$CORE"/lib/gson-*.jar | head -1)"
  for j in javafx-base javafx-controls javafx-graphics; do CP="$CP:/usr/share/java/$j.jar"; done
fi

TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/classes/zeus/qupath/extension/scripts"
"$J/javac" --release "${JAVA_RELEASE:-17}" -encoding UTF-8 -Xlint:-options -cp "$CP" -d "$TMP/classes" \
  $(find "$HERE/src/main/java" -name '*.java' | sort)
cp -r "$HERE/src/main/resources/." "$TMP/classes/"
cp "$REPO"/groovy/*.groovy "$TMP/classes/zeus/qupath/extension/scripts/"
printf 'version=%s\napi=%s\n' "$VERSION" "$API" > "$TMP/classes/zeus/qupath/extension/zeus-extension.properties"
printf 'Implementation-Title: zeus-qupath QuPath extension\nImplementation-Version: %s\n' "$VERSION" > "$TMP/manifest.txt"
mkdir -p "$(dirname "$OUT")"
"$J/jar" --create --file "$OUT.tmp" --manifest "$TMP/manifest.txt" -C "$TMP/classes" .
mv "$OUT.tmp" "$OUT"
echo "$OUT"
