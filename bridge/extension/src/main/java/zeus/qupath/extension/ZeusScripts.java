package zeus.qupath.extension;

import java.io.PrintWriter;
import java.io.StringWriter;
import java.io.Writer;

import javax.script.ScriptException;

import qupath.lib.gui.scripting.languages.GroovyLanguage;
import qupath.lib.images.ImageData;
import qupath.lib.projects.Project;
import qupath.lib.scripting.ScriptParameters;
import qupath.lib.scripting.languages.ExecutableLanguage;

/**
 * Runs the Groovy scripts of zeus-qupath's groovy/ folder (bundled into the jar at build time) through QuPath's
 * own Groovy engine, for an image of a project: the keep-edits rule and the label rule exist once, in those
 * scripts. Each run gets its own writer: QuPath 0.4.4's log writer throws on println (LoggingTools.LoggerWriter
 * never stores its logger) in scripts run without one.
 */
final class ZeusScripts {

    static final String SEGMENT = "zeus_segment_current_image.groovy";
    static final String IMPORT = "import_zeus_annotations.groovy";
    static final String EXPORT = "export_training_data.groovy";

    private ZeusScripts() {
    }

    /** A writer that keeps what the script printed and copies it to standard output (QuPath's console). */
    private static final class Tee extends Writer {
        private final StringBuilder kept = new StringBuilder();

        @Override
        public synchronized void write(char[] cbuf, int off, int len) {
            kept.append(cbuf, off, len);
            System.out.print(new String(cbuf, off, len));
        }

        @Override
        public void flush() {
            System.out.flush();
        }

        @Override
        public void close() {
            flush();
        }

        synchronized String text() {
            return kept.toString();
        }
    }

    /**
     * Runs a bundled script for {@code imageData} of {@code project} (either may be null) with args NAME=VALUE;
     * returns what it printed.
     */
    static String run(String name, Project<?> project, ImageData<?> imageData, String... args) throws ScriptException {
        Tee tee = new Tee();
        PrintWriter writer = new PrintWriter(tee, true);
        ScriptParameters params = ScriptParameters.builder()
                .setScript(ExtensionInfo.script(name))
                .setProject(project)
                .setImageData(imageData)
                .setArgs(args)
                .setWriter(writer)
                .setErrorWriter(writer)
                .build();
        ExecutableLanguage groovy = GroovyLanguage.getInstance();
        try {
            groovy.execute(params);
        } finally {
            writer.flush();
        }
        return tee.text();
    }

    /** The last line of a script's output that starts with "ZEUS", or "". */
    static String lastZeusLine(String output) {
        String last = "";
        for (String line : output.split("\\R")) {
            if (line.startsWith("ZEUS"))
                last = line;
        }
        return last;
    }

    static String stackless(Throwable e) {
        Throwable cause = e;
        while (cause.getCause() != null && cause.getCause() != cause)
            cause = cause.getCause();
        String text = cause.getMessage() == null ? cause.toString() : cause.getMessage();
        StringWriter w = new StringWriter();
        w.write(text.lines().findFirst().orElse(text));
        return w.toString();
    }
}
