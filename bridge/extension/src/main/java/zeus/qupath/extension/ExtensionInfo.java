package zeus.qupath.extension;

import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.util.Properties;

/** The extension's version and service API, written into the jar by build.sh (zeus-extension.properties). */
final class ExtensionInfo {

    private static final Properties PROPS = load();

    private ExtensionInfo() {
    }

    private static Properties load() {
        Properties props = new Properties();
        try (InputStream in = ExtensionInfo.class.getResourceAsStream("zeus-extension.properties")) {
            if (in != null)
                props.load(new java.io.InputStreamReader(in, StandardCharsets.UTF_8));
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return props;
    }

    /** zeus-qupath's version the jar was built from. */
    static String version() {
        return PROPS.getProperty("version", "unknown");
    }

    /** The service API version the jar was built for (bridge/service_schema.py API_VERSION). */
    static int apiVersion() {
        return Integer.parseInt(PROPS.getProperty("api", "0"));
    }

    /** A Groovy script of groovy/ bundled into the jar at build time. */
    static String script(String name) {
        try (InputStream in = ExtensionInfo.class.getResourceAsStream("scripts/" + name)) {
            if (in == null)
                throw new IllegalStateException("the jar lacks the bundled script " + name + " (rebuild it with make extension)");
            return new String(in.readAllBytes(), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }
}
